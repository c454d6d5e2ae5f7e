"""`seqdsl info` figures, checked against independent counts from transformers' models."""

from __future__ import annotations

import pytest

import seqdsl
from seqdsl.analysis import model_info
from seqdsl.cli import main

from conftest import SPECS


def _hf_count(config_name: str, model_name: str, **config) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, config_name)(**config)
    with torch.device("meta"):
        model = getattr(transformers, model_name)(cfg)
    return sum(p.numel() for p in model.parameters())


def test_mamba_parameter_count_matches_transformers():
    info = model_info(seqdsl.load(SPECS / "mamba.seq"))
    expected = _hf_count("MambaConfig", "MambaForCausalLM", vocab_size=50280, hidden_size=768,
                         num_hidden_layers=24, tie_word_embeddings=True)
    assert info.total_params == expected == 129_135_360


def test_griffin_parameter_count_matches_recurrent_gemma_2b():
    info = model_info(seqdsl.load(SPECS / "griffin.seq"))
    # recurrentgemma-2b: 26 layers, width 2560, MQA with one KV head, MLP 2 x 7680 (HF halves
    # intermediate_size), window 2048
    expected = _hf_count("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                         intermediate_size=15360, num_key_value_heads=1)
    assert info.total_params == expected


def test_mamba_state_sizes():
    program = seqdsl.load(SPECS / "mamba.seq")
    info = model_info(program, activation_dtype="float32")
    # per layer: fp32 SSM state [16 x 1536] + conv tail [3 x 1536] in the activation dtype
    per_layer = 16 * 1536 * 4 + 3 * 1536 * 4
    assert {l.state_bytes for l in info.layers} == {per_layer}
    assert info.kv_bytes_per_token == 0


def test_griffin_kv_window_is_bounded():
    info = model_info(seqdsl.load(SPECS / "griffin.seq"), activation_dtype="bfloat16")
    local = [l for l in info.layers if l.block == "local"]
    # the last window - 1 = 2047 tokens x 1 KV head x (256 + 256) x 2 bytes, nothing else
    assert {l.state_bytes for l in local} == {2047 * 512 * 2}
    assert info.kv_bytes_per_token == 0


def test_unbounded_kv_cache_is_reported_per_token(tmp_path):
    spec = tmp_path / "tfm.seq"
    spec.write_text('import "std/attention.seq"\n'
                    "model t(vocab = 10, d = 64) { layers = [b] * 3 }\n"
                    "block b { x = x + attn(rmsnorm(x), heads = 4, kv_heads = 2) }\n")
    (tmp_path / "std").symlink_to(SPECS / "std")
    info = model_info(seqdsl.load(spec), activation_dtype="float32")
    assert info.kv_bytes_per_token == 3 * 2 * (16 + 16) * 4
    assert info.state_bytes == 0


def test_flops_scale_with_the_attention_window():
    program = seqdsl.load(SPECS / "griffin.seq")
    short = model_info(program, context=512).flops_per_token
    long = model_info(program, context=4096).flops_per_token
    window = model_info(program, context=8192).flops_per_token
    assert short < long == window  # beyond the 2048 window attention costs no more


def test_info_cli(capsys):
    assert main(["info", str(SPECS / "mamba.seq"), "--states"]) == 0
    out = capsys.readouterr().out
    assert "129,135,360" in out
    assert "recurrent mamba.y [1, n=16, e=1536] float32" in out


def test_ir_cli_after_pass(capsys):
    assert main(["ir", str(SPECS / "hgrn.seq"), "--after", "build_graphs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# seqdsl IR after build_graphs")
    assert " : [" not in out  # no types before shape inference


def test_set_overrides_on_the_cli(capsys):
    assert main(["info", str(SPECS / "mamba.seq"), "--set", "depth=2", "--set", "mamba.n=8"]) == 0
    out = capsys.readouterr().out
    assert "  0 " in out and "  2 " not in out.split("embedding")[0]


def test_bundled_specs_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no specs/ folder here
    assert main(["check", "mamba", "griffin.seq"]) == 0
    out = capsys.readouterr().out
    assert "mamba.seq: ok" in out and "griffin.seq: ok" in out
    assert main(["check", "no_such_spec"]) == 1
