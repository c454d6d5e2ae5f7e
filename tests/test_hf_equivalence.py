"""The bundled specs against transformers' independent implementations: same weights, same logits.

A tiny randomly initialised transformers model is built on CPU; its weights are loaded into the
model generated from the *bundled* spec (`specs/mamba.seq`, `mamba2.seq`, `jamba.seq`,
`griffin.seq`, shrunk with overrides) by the importer's weight tables (`seqdsl.interop.load_hf`:
the bundled specs use the names the importer writes); logits must agree to fp32 precision on
random tokens, at a length not a multiple of any chunk, and 20 tokens of greedy generation must be
the transformers model's argmax choices. tests/test_interop.py checks the specs the importer
writes from the configs, Qwen3-Next and the export.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import seqdsl  # noqa: E402
from seqdsl.interop import load_hf  # noqa: E402
from seqdsl.ops.tolerances import assert_close  # noqa: E402

from conftest import SPECS, assert_greedy_matches  # noqa: E402


def _compare(ours, hf, vocab, T=37):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
        reference, _ = ours(ids, reference=True)
    assert_close(got, expected, torch.float32, "chunked path vs transformers")
    assert_close(reference, expected, torch.float32, "reference path vs transformers")
    assert_greedy_matches(ours, hf, ids)


def test_mamba_matches_transformers():
    d, n, layers, vocab = 32, 8, 2, 64
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=d, state_size=n,
                                   num_hidden_layers=layers, expand=2, conv_kernel=4,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(cfg).eval()
    module = seqdsl.compile(SPECS / "mamba.seq", vocab=vocab, d=d, depth=layers, mamba={"n": n})
    _compare(load_hf(module, hf).eval(), hf, vocab)


def test_mamba2_matches_transformers():
    d, n, hd, layers, vocab = 32, 8, 8, 2, 64
    cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=d, state_size=n,
                                    num_hidden_layers=layers, expand=2, head_dim=hd,
                                    num_heads=2 * d // hd, n_groups=1, conv_kernel=4,
                                    tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    module = seqdsl.compile(SPECS / "mamba2.seq", vocab=vocab, d=d, depth=layers,
                            mamba2={"n": n, "hd": hd})
    _compare(load_hf(module, hf).eval(), hf, vocab)


def test_jamba_matches_transformers():
    """Mamba + attention 1:7 + mixture of experts every other layer."""
    d, n, hidden, layers, vocab, experts = 32, 8, 48, 8, 64, 4
    cfg = transformers.JambaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2,
        mamba_d_state=n, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=2,
        attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1)
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(cfg).eval()
    module = seqdsl.compile(SPECS / "jamba.seq", vocab=vocab, d=d, depth=layers, hidden=hidden,
                            heads=4, kv_heads=2, n_experts=experts, jamba_mamba={"n": n})
    _compare(load_hf(module, hf).eval(), hf, vocab)


def test_recurrent_gemma_matches_transformers():
    """Griffin: RG-LRU blocks and local multi-query attention with partial rotary, 2:1."""
    d, heads, layers, vocab, window = 32, 4, 3, 64, 8
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=vocab, hidden_size=d, lru_width=d, num_attention_heads=heads,
        num_key_value_heads=1, intermediate_size=2 * 3 * d, num_hidden_layers=layers,
        attention_window_size=window, conv1d_width=4,
        block_types=["recurrent", "recurrent", "attention"])
    torch.manual_seed(0)
    hf = transformers.RecurrentGemmaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises some of these to zeros: make them count
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.normal_(0, 0.1)
    module = seqdsl.compile(SPECS / "griffin.seq", vocab=vocab, d=d, depth=layers,
                            rglru={"heads": heads}, local={"heads": heads, "window": window})
    _compare(load_hf(module, hf).eval(), hf, vocab)
