"""The torch backend on every spec of the library, at a tiny size: the model-level invariants.

For each spec: it compiles and imports; forward, backward and generate run in fp32 and bf16; the
chunked path equals the sequential reference path; a prefix forward followed by step() calls
equals the full forward; packed sequences (cu_seqlens) equal a loop over them; gradients of the
two paths agree; the parameter count and the carried state equal what `seqdsl info` computes.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import seqdsl  # noqa: E402
from seqdsl.analysis import model_info  # noqa: E402
from seqdsl.ops.tolerances import assert_close  # noqa: E402

from conftest import MODEL_SPECS, prefix_then_steps, tiny_overrides  # noqa: E402

@pytest.fixture(scope="module", params=MODEL_SPECS, ids=[p.stem for p in MODEL_SPECS])
def compiled(request):
    path = request.param
    overrides = tiny_overrides(path)
    module = seqdsl.compile(path, **overrides)
    program = seqdsl.load(path, **overrides)
    torch.manual_seed(0)
    model = module.Model().float()
    return path, module, model, program


def _ids(model, B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.embed.num_embeddings, (B, T), generator=g)


def test_forward_shapes_and_finite(compiled):
    _, _, model, _ = compiled
    ids = _ids(model)
    logits, state = model(ids)
    assert logits.shape == (*ids.shape, model.embed.num_embeddings)
    assert torch.isfinite(logits).all()
    assert len(state) == len(model.layers)


def test_chunked_equals_reference(compiled):
    _, _, model, _ = compiled
    ids = _ids(model, T=37)
    fast, _ = model(ids)
    ref, _ = model(ids, reference=True)
    assert_close(fast, ref, torch.float32, "chunked vs reference logits")


def test_prefix_then_steps_equals_full_forward(compiled):
    _, _, model, _ = compiled
    ids = _ids(model, T=11)
    full, _ = model(ids)
    assert_close(prefix_then_steps(model, ids, 6), full, torch.float32,
                 "prefix + step vs full forward")


def test_packed_sequences_equal_a_loop(compiled):
    _, _, model, _ = compiled
    lengths = [5, 9, 3]
    ids = _ids(model, B=1, T=sum(lengths))
    cu = torch.tensor([0, 5, 14, 17])
    packed, _ = model(ids, cu_seqlens=cu)
    pieces = [model(ids[:, a:b])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert_close(packed, torch.cat(pieces, 1), torch.float32, "cu_seqlens vs loop")


@pytest.mark.parametrize("B, T", [(2, 19), (1, 128)], ids=["T=19", "T=128"])
def test_gradients_match_the_reference_path(compiled, B, T):
    """At T = 128 (whole blocks) the fast paths' hand-written backwards run their in-place
    scans: the blocked scan needs T >= 64, and the recurrent widths here reach its 32 entries."""
    _, _, model, _ = compiled
    ids = _ids(model, B=B, T=T)
    w = torch.randn(ids.shape[0], ids.shape[1], model.embed.num_embeddings,
                    generator=torch.Generator().manual_seed(3))
    grads = []
    for reference in (False, True):
        model.zero_grad()
        logits, _ = model(ids, reference=reference)
        (logits * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:  # a different algorithm: the table's whole-model gradient bounds
        assert_close(grads[0][name], grads[1][name], torch.float32, f"grad of {name}",
                     model_gradient=True)


def test_generate(compiled):
    _, _, model, _ = compiled
    ids = _ids(model, B=2, T=4)
    out = model.generate(ids, max_new_tokens=5, temperature=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids)
    again = model.generate(ids, max_new_tokens=5, temperature=0)
    assert torch.equal(out, again)
    sampled = model.generate(ids, 3, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 7)
    assert torch.equal(model.generate(ids, 0), ids)   # nothing new, the prompt back


@pytest.mark.parametrize("lengths", [[5, 9, 3], [4, 4], [1, 7]], ids=["ragged", "equal", "one token"])
def test_a_packed_forward_state_continues_each_sequence(compiled, lengths):
    """After a packed forward (cu_seqlens), the state holds one row per sequence (attention
    layers: one KV cache row each, left-padded when the lengths differ) and continues each
    sequence exactly: a batch continuation of two tokens, then step(), equal the unpacked
    forward over each sequence and its continuation."""
    _, _, model, _ = compiled
    T = sum(lengths)
    ids = _ids(model, B=1, T=T)
    more = _ids(model, B=len(lengths), T=3, seed=7)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    _, state = model(ids, cu_seqlens=cu)
    two, state = model(more[:, :2], state)
    last, _ = model.step(more[:, 2], state)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, _ = model(torch.cat([ids[:, a:b], more[i:i + 1]], dim=1))
        got = torch.cat([two[i], last[i:i + 1]])
        assert_close(got, alone[0, -3:], torch.float32, f"sequence {i}: packed, then continued")


def test_empty_input_gives_empty_logits_and_keeps_the_state(compiled):
    _, _, model, _ = compiled
    ids = _ids(model, B=2, T=4)
    logits, state = model(ids[:, :0])
    assert logits.shape == (2, 0, model.embed.num_embeddings) and state is None
    _, state = model(ids)
    logits, again = model(ids[:, :0], state)
    assert logits.shape == (2, 0, model.embed.num_embeddings) and again is state


@pytest.mark.parametrize("case, message", [
    ("one-dim", "must be a \\[B, T\\] tensor"),
    ("float ids", "integer token ids"),
    ("outside vocab", "outside the vocabulary"),
    ("cu_seqlens from 2", "rise from 0"),
    ("cu_seqlens decreasing", "rise from 0"),
    ("cu_seqlens short", "rise from 0"),
    ("cu_seqlens float", "integer tensor"),
    ("cu_seqlens with batch 2", "batch 1"),
    ("state of another batch", "state is for 2 sequence"),
    ("step of [B, 1]", "one token per sequence"),
    ("negative max_new_tokens", "max_new_tokens"),
    ("negative temperature", "temperature"),
    ("top_k 0", "top_k"),
])
def test_bad_calls_get_one_clear_error_before_any_layer(compiled, case, message):
    """Every spec rejects the same mistakes with the same message (checked up front, not by
    whichever layer trips first, and never silently broadcast)."""
    _, _, model, _ = compiled
    vocab = model.embed.num_embeddings
    ids = _ids(model, B=1, T=8)
    calls = {
        "one-dim": lambda: model(ids[0]),
        "float ids": lambda: model(ids.float()),
        "outside vocab": lambda: model(ids + vocab),
        "cu_seqlens from 2": lambda: model(ids, cu_seqlens=torch.tensor([2, 5, 8])),
        "cu_seqlens decreasing": lambda: model(ids, cu_seqlens=torch.tensor([0, 6, 5, 8])),
        "cu_seqlens short": lambda: model(ids, cu_seqlens=torch.tensor([0, 5, 7])),
        "cu_seqlens float": lambda: model(ids, cu_seqlens=torch.tensor([0.0, 5.0, 8.0])),
        "cu_seqlens with batch 2": lambda: model(ids.expand(2, -1),
                                                 cu_seqlens=torch.tensor([0, 8])),
        "state of another batch": lambda: model.step(ids[0, :3], model(ids.expand(2, -1))[1]),
        "step of [B, 1]": lambda: model.step(ids[:, :1], None),
        "negative max_new_tokens": lambda: model.generate(ids, -1),
        "negative temperature": lambda: model.generate(ids, 2, temperature=-1.0),
        "top_k 0": lambda: model.generate(ids, 2, top_k=0),
    }
    with pytest.raises(ValueError, match=message):
        calls[case]()


def test_bf16_forward_backward(compiled):
    path, module, _, _ = compiled
    torch.manual_seed(0)
    model = module.Model().to(torch.bfloat16)
    ids = _ids(model, T=9)
    logits, state = model(ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():   # the sequential reference path takes bf16 parameters too
        ref, _ = model(ids, reference=True)
    assert ref.dtype == torch.bfloat16 and torch.isfinite(ref.float()).all()


def test_parameter_count_and_state_size_match_info(compiled):
    _, _, model, program = compiled
    info = model_info(program, activation_dtype="float32")
    assert sum(p.numel() for p in model.parameters()) == info.total_params
    T = 9
    _, state = model(_ids(model, B=1, T=T))
    def nbytes(value) -> int:  # a layer's state nests one dict per sub-module
        if isinstance(value, dict):
            return sum(nbytes(v) for v in value.values())
        tensors = value[:2] if isinstance(value, tuple) else (value,)  # KV: (k, v, seen)
        return sum(t.numel() * t.element_size() for t in tensors)

    carried = sum(nbytes(layer_state) for layer_state in state)
    # recurrent states and conv tails as info computes them; KV caches hold the tokens seen so
    # far, at most window - 1 of them
    expected = 0
    for layer in program.layers:
        for st in program.blocks[layer.instance].states:
            if st.kind != "kv":
                expected += st.bytes(4)
                continue
            node = program.blocks[layer.instance].graph.node(st.node)
            per_token = node.attr("kv_heads") * (node.attr("key_dim") + node.attr("value_dim")) * 4
            window = node.attr("window")
            expected += per_token * (T if window is None else min(T, window - 1))
    assert carried == expected


def test_compile_cache_returns_the_same_module(compiled):
    path, module, _, _ = compiled
    again = seqdsl.compile(path, **tiny_overrides(path))
    assert again is module


def test_generated_source_is_deterministic_and_banner(compiled):
    path, _, _, program = compiled
    from seqdsl.backends.torch.codegen import generate_source
    a = generate_source(program)
    assert a == generate_source(seqdsl.load(path, **tiny_overrides(path)))
    assert a.startswith(f"# Generated by seqdsl {seqdsl.__version__} from {path.name} -- do not edit.")
    assert "# spec: " in a


@pytest.mark.parametrize("name", ["mamba", "deltaproduct", "jamba", "griffin"])
def test_generated_module_snapshot(name):
    """Process replay: a change to the generator shows up as a diff of generated code."""
    from conftest import SPECS, assert_snapshot
    from seqdsl.backends.torch.codegen import generate_source
    path = SPECS / f"{name}.seq"
    source = generate_source(seqdsl.load(path, **tiny_overrides(path)))
    assert_snapshot(f"{name}_tiny.py.txt", source)


def _map_state(state, fn):
    """Apply fn to every tensor of a model state (dicts per layer and sub-module, KV tuples)."""
    if isinstance(state, dict):
        return {k: _map_state(v, fn) for k, v in state.items()}
    if isinstance(state, list):
        return [_map_state(v, fn) for v in state]
    if isinstance(state, tuple):  # KV cache: (k, v, tokens seen)
        return (fn(state[0]), fn(state[1]), state[2])
    return fn(state)


def test_gradient_into_the_initial_state_matches_the_reference(compiled):
    """Gradients flow into a carried state (recurrent states, conv tails, KV caches) and agree
    between the chunked and the reference paths."""
    _, _, model, _ = compiled
    ids = _ids(model, T=17)
    with torch.no_grad():
        _, state = model(ids[:, :8])
    w = torch.randn(ids.shape[0], 9, model.embed.num_embeddings,
                    generator=torch.Generator().manual_seed(5))
    grads = []
    for reference in (False, True):
        leaves = []

        def leaf(t):
            t = t.detach().clone().requires_grad_(t.is_floating_point() or t.is_complex())
            leaves.append(t)
            return t

        start = _map_state(state, leaf)
        logits, _ = model(ids[:, 8:], start, reference=reference)
        tensors = [t for t in leaves if t.requires_grad]
        grads.append(torch.autograd.grad((logits * w).sum(), tensors, allow_unused=True))
    assert grads[0]
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all()
            assert_close(a, b, a.dtype if not a.is_complex() else torch.float32,
                         "gradient w.r.t. the initial state")


def test_every_chunk_size_agrees(compiled):
    """The chunked forms at several chunk sizes, T not a multiple of any, equal the default."""
    _, _, model, _ = compiled
    ids = _ids(model, T=45)
    default, _ = model(ids)
    for chunk in (8, 16, 32):
        logits, _ = model(ids, chunk_size=chunk)
        assert_close(logits, default, torch.float32, f"chunk_size={chunk} vs default")
