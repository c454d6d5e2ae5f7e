"""Whole models against transformers' independent implementations: same weights, same logits.

A tiny randomly initialised transformers model is built on CPU; its weights are copied into the
model generated from the bundled spec by an explicit name map (the full importer is future work);
logits must agree to fp32 precision on random tokens, at a length not a multiple of any chunk, and
greedy generation must produce the same tokens.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import seqdsl  # noqa: E402
from seqdsl.ops.tolerances import assert_close  # noqa: E402

from conftest import SPECS  # noqa: E402


def _copy(ours: torch.nn.Module, theirs: dict[str, torch.Tensor], mapping: dict[str, tuple]):
    """mapping: our name -> (their name, transform or None). Every parameter must be mapped."""
    params = dict(ours.named_parameters())
    assert set(mapping) == set(params), f"unmapped: {sorted(set(params) - set(mapping))}"
    with torch.no_grad():
        for name, (src, transform) in mapping.items():
            value = theirs[src]
            value = transform(value) if transform else value
            assert params[name].shape == value.shape, (name, params[name].shape, value.shape)
            params[name].copy_(value)


def _compare(ours, hf, vocab, T=37):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
        reference, _ = ours(ids, reference=True)
    assert_close(got, expected, torch.float32, "chunked path vs transformers")
    assert_close(reference, expected, torch.float32, "reference path vs transformers")
    prompt = ids[:, :5]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
        mine = ours.generate(prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(mine, theirs[:, :mine.shape[1]])


def test_mamba_matches_transformers():
    d, n, layers, vocab = 32, 8, 2, 64
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=d, state_size=n,
                                   num_hidden_layers=layers, expand=2, conv_kernel=4,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(cfg).eval()
    module = seqdsl.compile(SPECS / "mamba.seq", vocab=vocab, d=d, depth=layers, mamba={"n": n})
    ours = module.Model().eval()
    mapping = {"embed.weight": ("backbone.embeddings.weight", None),
               "norm.rmsnorm.weight": ("backbone.norm_f.weight", None)}
    for i in range(layers):
        hf_l, us = f"backbone.layers.{i}.", f"layers.{i}."
        mapping.update({
            us + "rmsnorm.weight": (hf_l + "norm.weight", None),
            us + "mamba.u_z_proj.weight": (hf_l + "mixer.in_proj.weight", None),
            us + "mamba.u_conv1d.weight": (hf_l + "mixer.conv1d.weight", None),
            us + "mamba.u_conv1d.bias": (hf_l + "mixer.conv1d.bias", None),
            us + "mamba.r_B_C_proj.weight": (hf_l + "mixer.x_proj.weight", None),
            us + "mamba.dt_proj.weight": (hf_l + "mixer.dt_proj.weight", None),
            us + "mamba.dt_proj.bias": (hf_l + "mixer.dt_proj.bias", None),
            us + "mamba.A_weight": (hf_l + "mixer.A_log", lambda a: a.t()),  # [E, N] -> [N, E]
            us + "mamba.y_weight": (hf_l + "mixer.D", None),
            us + "mamba.out.weight": (hf_l + "mixer.out_proj.weight", None),
        })
    _copy(ours, hf.state_dict(), mapping)
    _compare(ours, hf, vocab)


def test_mamba2_matches_transformers():
    d, n, hd, layers, vocab = 32, 8, 8, 2, 64
    e, nh = 2 * d, 2 * d // hd
    cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=d, state_size=n,
                                    num_hidden_layers=layers, expand=2, head_dim=hd, num_heads=nh,
                                    n_groups=1, conv_kernel=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    module = seqdsl.compile(SPECS / "mamba2.seq", vocab=vocab, d=d, depth=layers,
                            mamba2={"n": n, "hd": hd})
    ours = module.Model().eval()
    mapping = {"embed.weight": ("backbone.embeddings.weight", None),
               "norm.rmsnorm.weight": ("backbone.norm_f.weight", None)}
    for i in range(layers):
        hf_l, us = f"backbone.layers.{i}.", f"layers.{i}."
        # transformers fuses [z, x B C, dt] into one in_proj
        rows = {"z": (0, e), "xBC": (e, 2 * e + 2 * n), "dt": (2 * e + 2 * n, 2 * e + 2 * n + nh)}

        def part(key):
            a, b = rows[key]
            return lambda w: w[a:b]
        mapping.update({
            us + "rmsnorm.weight": (hf_l + "norm.weight", None),
            us + "mamba2.z.weight": (hf_l + "mixer.in_proj.weight", part("z")),
            us + "mamba2.u_B_C_proj.weight": (hf_l + "mixer.in_proj.weight", part("xBC")),
            us + "mamba2.dt_proj.weight": (hf_l + "mixer.in_proj.weight", part("dt")),
            us + "mamba2.dt_proj.bias": (hf_l + "mixer.dt_bias", None),
            us + "mamba2.u_B_C_conv1d.weight": (hf_l + "mixer.conv1d.weight", None),
            us + "mamba2.u_B_C_conv1d.bias": (hf_l + "mixer.conv1d.bias", None),
            us + "mamba2.A_log": (hf_l + "mixer.A_log", None),
            us + "mamba2.D": (hf_l + "mixer.D", None),
            us + "mamba2.rmsnorm_gated_after.out.weight": (hf_l + "mixer.norm.weight", None),
            us + "mamba2.out.weight": (hf_l + "mixer.out_proj.weight", None),
        })
    _copy(ours, hf.state_dict(), mapping)
    _compare(ours, hf, vocab)
