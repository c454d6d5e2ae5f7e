"""Checkpoint interop: transformers configs → specs, weights in and out, the same logits.

For each family a tiny randomly initialised transformers model is built on CPU; its config is
imported (`import_config`), the spec is checked (`seqdsl check`) and compiled, the weights are
loaded (`load_hf`), and the logits must match transformers' to fp32 precision at a length that is
not a multiple of any chunk, 20 greedy tokens must be transformers' argmax choices, and the export
must give back transformers' state dict bit for bit. Then the pattern conventions, the
contradictions, and the `seqdsl import hf` command.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import seqdsl  # noqa: E402
from seqdsl import SpecError  # noqa: E402
from seqdsl.cli import main  # noqa: E402
from seqdsl.interop import export_hf, import_config, load_hf  # noqa: E402
from seqdsl.interop.patterns import resolve_kinds  # noqa: E402
from seqdsl.ops.tolerances import assert_close, errors  # noqa: E402

from conftest import assert_greedy_matches  # noqa: E402

VOCAB = 64


@pytest.fixture(autouse=True)
def torch_gated_delta_rule(monkeypatch):
    """Qwen3Next picks fla's Triton kernels at import when fla is importable (it is, for the
    oracle tests), and those need a GPU: use transformers' own PyTorch fallbacks."""
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                 "causal_conv1d_fn", "causal_conv1d_update"):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, getattr(fn, "__wrapped__", fn))


def _mamba():
    return transformers.MambaForCausalLM, transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        conv_kernel=4, time_step_rank=4, tie_word_embeddings=True)


def _mamba2():
    return transformers.Mamba2ForCausalLM, transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        head_dim=8, num_heads=8, n_groups=1, conv_kernel=4, tie_word_embeddings=False)


def _jamba():
    return transformers.JambaForCausalLM, transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=2,
        attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1)


def _recurrent_gemma():
    return transformers.RecurrentGemmaForCausalLM, transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, lru_width=32, num_attention_heads=4,
        num_key_value_heads=1, intermediate_size=2 * 3 * 32, num_hidden_layers=3,
        attention_window_size=8, conv1d_width=4,
        block_types=["recurrent", "recurrent", "attention"])


def _qwen3_next():
    return transformers.Qwen3NextForCausalLM, transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_conv_kernel_dim=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, full_attention_interval=2)


# variants: options each family's table must honour
def _mamba_biases():
    return transformers.MambaForCausalLM, transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, use_bias=True,
        use_conv_bias=False, tie_word_embeddings=False)


def _mamba2_groups():
    return transformers.Mamba2ForCausalLM, transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        head_dim=8, num_heads=8, n_groups=2, conv_kernel=4)


def _jamba_dense():
    return transformers.JambaForCausalLM, transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=1, mamba_d_state=8,
        mamba_dt_rank=2, attn_layer_period=2, attn_layer_offset=1, mamba_proj_bias=True)


def _qwen3_next_variant():
    """One key head for two value heads of another width, an explicit layer list, an MLP-only
    layer, MoE weights not renormalised, a tied head."""
    return transformers.Qwen3NextForCausalLM, transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8,
        linear_value_head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention",
                     "linear_attention", "full_attention"], tie_word_embeddings=True)


FAMILIES = {"mamba": _mamba, "mamba2": _mamba2, "jamba": _jamba,
            "recurrent_gemma": _recurrent_gemma, "qwen3_next": _qwen3_next,
            "mamba_biases": _mamba_biases, "mamba2_groups": _mamba2_groups,
            "jamba_dense": _jamba_dense, "qwen3_next_variant": _qwen3_next_variant}


def _tiny(name):
    cls, cfg = FAMILIES[name]()
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():  # transformers initialises norms and biases to constants: make them count
        for pname, p in hf.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.normal_(0, 0.1)
    return hf


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_transformers(name, tmp_path, capsys):
    hf = _tiny(name)
    imported = import_config(hf.config)
    spec = tmp_path / f"{imported.name}.seq"
    spec.write_text(imported.spec_text)
    assert main(["check", str(spec)]) == 0, capsys.readouterr().err
    ours = load_hf(seqdsl.compile(spec), hf).eval()

    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
        reference, _ = ours(ids, reference=True)
    assert_close(got, expected, torch.float32, f"{name}: chunked path vs transformers")
    assert_close(reference, expected, torch.float32, f"{name}: reference path vs transformers")
    print(f"{name}: rel RMS error {errors(got, expected)[0]:.2e}")
    assert_greedy_matches(ours, hf, ids)

    exported = export_hf(ours, hf.config)
    original = hf.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].shape == value.shape and torch.equal(exported[key], value), key


def test_spec_reads_like_a_hand_written_one():
    cls, cfg = _jamba()
    text = import_config(cfg).spec_text
    assert "layers = [jamba_layer(attn = i % 8 == 4, moe = i % 2 == 1) for i in range(depth)]" in text
    assert "rmsnorm(x, eps = 1e-6)" in text
    for noise in ("None", "True", "False", "1e-06", "0.30000000000000004"):
        assert noise not in text
    griffin = import_config(_recurrent_gemma()[1]).spec_text
    assert "layers = periodic(depth, rec, local, period = 3, offset = 2)" in griffin
    assert "rmsnorm(x, eps = 1e-6, offset = 1.0)" in griffin


def test_state_dict_input_and_the_bundled_specs():
    """load_hf takes a state dict with its config, and loads into the bundled specs too (their
    names are the ones the importer writes)."""
    hf = _tiny("mamba")
    module = seqdsl.compile("specs/mamba.seq", vocab=VOCAB, d=32, depth=2,
                            mamba={"n": 8, "rank": 4})
    ours = load_hf(module, hf.state_dict(), config=hf.config.to_dict()).eval()
    ids = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids)[0], hf(ids).logits, torch.float32, "bundled mamba.seq")


def test_unmapped_and_missing_tensors_are_errors():
    hf = _tiny("mamba")
    sd = dict(hf.state_dict())
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(1)
    with pytest.raises(SpecError, match="not mapped: backbone.layers.0.mixer.extra"):
        load_hf(None, sd, config=hf.config)
    del sd["backbone.layers.0.mixer.extra"], sd["backbone.layers.1.mixer.D"]
    with pytest.raises(SpecError, match="lacks 1 tensor.*backbone.layers.1.mixer.D"):
        load_hf(None, sd, config=hf.config)


# ---- layer pattern conventions -------------------------------------------------------------------

R, A, MLP, MOE = "recurrent", "attention", "mlp", "moe"


@pytest.mark.parametrize("cfg, kinds", [
    ({"num_hidden_layers": 3, "layers_block_type": ["mamba", "attention", "mamba"]}, [R, A, R]),
    ({"num_hidden_layers": 3, "layer_types": ["linear_attention", "full_attention",
                                              "sliding_attention"]}, [R, A, A]),
    ({"num_hidden_layers": 5, "attn_layer_period": 4, "attn_layer_offset": 1}, [R, A, R, R, R]),
    ({"num_hidden_layers": 5, "block_types": ["recurrent", "attention"]}, [R, A, R, A, R]),
    ({"num_hidden_layers": 4, "attn_layer_indices": [0, 3]}, [A, R, R, A]),
    ({"num_hidden_layers": 4, "attn_layer_idx": [2]}, [R, R, A, R]),
    ({"num_hidden_layers": 4, "full_attn_idxs": [1]}, [R, A, R, R]),
    ({"num_hidden_layers": 4, "linear_attn_config": {"full_attn_layers": [1, 4]}}, [A, R, R, A]),
    ({"num_hidden_layers": 6, "full_attention_interval": 3}, [R, R, A, R, R, A]),
    ({"num_hidden_layers": 6, "hybrid_override_pattern": "M-M*-E"}, [R, MLP, R, A, MLP, MOE]),
    ({"hybrid_override_pattern": "MM*|MM*"}, [R, R, A, R, R, A]),
    ({"num_hidden_layers": 2}, [R, R]),
])
def test_pattern_conventions(cfg, kinds):
    assert resolve_kinds(cfg)[0] == kinds


def test_consistent_conventions_agree():
    cfg = {"num_hidden_layers": 8, "attn_layer_period": 4, "attn_layer_offset": 3,
           "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["mamba"] * 3 + ["attention"],
           "full_attention_interval": 4}
    kinds, fields = resolve_kinds(cfg)
    assert kinds == [R, R, R, A] * 2 and len(fields) == 3


@pytest.mark.parametrize("cfg, message", [
    ({"num_hidden_layers": 8, "attn_layer_period": 8, "attn_layer_offset": 4,
      "layers_block_type": ["mamba"] * 3 + ["attention"] + ["mamba"] * 4},
     "'layers_block_type' and 'attn_layer_period' / 'attn_layer_offset' contradict each other: "
     "layer 3 is attention by the first and recurrent by the second"),
    ({"num_hidden_layers": 4, "layer_types": ["linear_attention"] * 4, "full_attention_interval": 4},
     "'layer_types' and 'full_attention_interval' contradict each other: layer 3 is recurrent"),
    ({"num_hidden_layers": 3, "layers_block_type": ["mamba", "attention"]},
     "'layers_block_type' describes 2 layers but 'num_hidden_layers' is 3"),
    ({"num_hidden_layers": 4, "attn_layer_indices": [1], "hybrid_override_pattern": "M*MM"},
     None),  # consistent: no error
    ({"num_hidden_layers": 4, "attn_layer_indices": [4]}, "lists layer 4, outside 0..3"),
    ({"num_hidden_layers": 4, "linear_attn_config": {"full_attn_layers": [0]}},
     "lists layer 0, outside 1..4 (1-based, 4 layers)"),
    ({"num_hidden_layers": 2, "hybrid_override_pattern": "MX"}, "the character 'X'"),
    ({"num_hidden_layers": 2, "layer_types": ["mamba", "transformer"]}, "an unknown layer type"),
    ({"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 2}, "need 0 <= offset"),
])
def test_contradictions_and_bad_patterns(cfg, message):
    if message is None:
        resolve_kinds(cfg)
        return
    with pytest.raises(SpecError) as info:
        resolve_kinds(cfg, "config.json")
    assert message in str(info.value)
    assert str(info.value).startswith("config.json: error: ")


def test_family_level_errors():
    _, cfg = _jamba()
    d = cfg.to_dict()
    d["layers_block_type"] = ["mamba"] * 8  # Jamba's period/offset say layer 4 is attention
    with pytest.raises(SpecError, match="contradict each other: layer 4"):
        import_config(d)
    _, mcfg = _mamba()
    with pytest.raises(SpecError, match="layer 1 is a attention layer.*does not have"):
        import_config({**mcfg.to_dict(), "layer_types": ["mamba", "attention"]})
    with pytest.raises(SpecError, match="'hidden_act' = 'gelu' is not supported"):
        import_config({**mcfg.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(SpecError, match="unsupported model: model_type 'llama'"):
        import_config({"model_type": "llama"})
    _, m2 = _mamba2()
    with pytest.raises(SpecError, match="'time_step_limit'"):
        import_config({**m2.to_dict(), "time_step_limit": [0.0, 0.1]})
    with pytest.raises(SpecError, match="'layer_norm_epsilon' is nan; a spec holds finite"):
        import_config({**mcfg.to_dict(), "layer_norm_epsilon": float("nan")})


def test_non_periodic_patterns_use_pattern_strings():
    _, cfg = _jamba()
    d = cfg.to_dict()
    for k in ("attn_layer_period", "attn_layer_offset"):
        d.pop(k)
    d["layers_block_type"] = ["mamba", "attention", "mamba", "mamba", "mamba", "mamba",
                              "attention", "attention"]
    imported = import_config(d)
    # MoE on odd layers (expert period 2, offset 1): layers 1 and 7 have both
    assert 'layers = pattern("MAMEME*A", M = jamba_layer, A = jamba_layer(attn = true, moe = true), ' \
           'E = jamba_layer(moe = true), "*" = jamba_layer(attn = true))' in imported.spec_text
    program = seqdsl.load("jamba.seq", text=imported.spec_text)
    assert [l.instance for l in program.layers][1] != [l.instance for l in program.layers][0]


# ---- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jamba", "qwen3_next"])
def test_cli_import_hf(name, tmp_path, capsys):
    hf = _tiny(name)
    hf.save_pretrained(tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    # config only: the spec to stdout, or to a file
    assert main(["import", "hf", str(config)]) == 0
    text = capsys.readouterr().out
    assert text == import_config(json.loads(config.read_text())).spec_text
    assert main(["import", "hf", str(config), "-o", str(tmp_path / "only.seq")]) == 0
    assert (tmp_path / "only.seq").read_text() == text
    # with the checkpoint: the spec and a state dict the compiled model loads strictly
    out = tmp_path / "out"
    assert main(["import", "hf", str(config), "--weights", str(tmp_path / "hf"), "-o", str(out)]) == 0
    spec = out / f"{import_config(hf.config).name}.seq"
    assert main(["check", str(spec)]) == 0
    model = seqdsl.compile(spec).Model().eval()
    model.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True), strict=True)
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(model(ids)[0], hf(ids).logits, torch.float32, "CLI-converted weights")


def test_cli_import_errors_write_nothing(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "jamba", "num_hidden_layers": 8, "hidden_size": 32,
                               "vocab_size": 64, "intermediate_size": 48,
                               "num_attention_heads": 4, "attn_layer_period": 8,
                               "attn_layer_offset": 4, "layers_block_type": ["mamba"] * 8}))
    assert main(["import", "hf", str(bad), "-o", str(tmp_path / "x.seq")]) == 1
    err = capsys.readouterr().err
    assert "contradict each other" in err and "Traceback" not in err
    assert not (tmp_path / "x.seq").exists()
    (tmp_path / "empty").mkdir()
    _, cfg = _mamba()
    cfg.save_pretrained(tmp_path / "cfg")
    assert main(["import", "hf", str(tmp_path / "cfg" / "config.json"), "--weights",
                 str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    assert "no checkpoint found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["import", "hf", str(tmp_path / "missing.json")]) == 1
    assert "no such file" in capsys.readouterr().err
