"""The runtime building blocks the generated modules use, against independent formulations."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from seqdsl import ops, runtime as rt  # noqa: E402
from seqdsl.ops.tolerances import assert_close  # noqa: E402


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [11, 3, 2, 1])
def test_causal_conv_matches_conv1d_and_carries_its_tail(bias, T):
    """Against F.conv1d on the zero-padded input: from no tail (the shifted-slice form, or
    the concatenated one when T < width - 1), from a tail in two pieces, and the tail
    carried (the last width - 1 inputs, zeros before the start)."""
    g = torch.Generator().manual_seed(0)
    conv = rt.CausalConv1d(6, 4, bias=bias)
    if bias:
        torch.nn.init.normal_(conv.bias, generator=g)
    x = torch.randn(2, T, 6, generator=g)
    y, tail = conv(x)
    padded = F.pad(x.transpose(1, 2), (3, 0))
    expected = F.conv1d(padded, conv.weight, conv.bias, groups=6).transpose(1, 2)
    assert_close(y, expected, torch.float32, f"conv vs F.conv1d, T={T}")
    assert torch.equal(tail, padded.transpose(1, 2)[:, -3:])
    cut = T // 2
    y1, t1 = conv(x[:, :cut]) if cut else (x[:, :0], None)
    y2, _ = conv(x[:, cut:], t1)
    assert_close(torch.cat([y1, y2], 1), y, torch.float32, f"conv in two pieces, T={T}")


def test_conv_resets_between_packed_sequences():
    conv = rt.CausalConv1d(3, 3)
    x = torch.randn(1, 9, 3)
    cu = torch.tensor([0, 4, 9])
    packed, tails = conv(x, None, cu)
    loop = torch.cat([conv(x[:, :4])[0], conv(x[:, 4:])[0]], 1)
    assert_close(packed, loop, torch.float32, "cu_seqlens vs loop")
    assert tails.shape == (2, 2, 3)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_after_a_cache_equals_full_attention(window):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 10, 4, 8, generator=g) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA: 4 query heads, 2 key/value heads
    full, _ = rt.attention(q, k, v, None, window, None, None, 10000.0, None, rt.DEFAULT_RUN)
    first, cache = rt.attention(q[:, :6], k[:, :6], v[:, :6], None, window, None, None, 10000.0,
                                None, rt.DEFAULT_RUN)
    rest, _ = rt.attention(q[:, 6:], k[:, 6:], v[:, 6:], cache, window, None, None, 10000.0,
                           None, rt.DEFAULT_RUN)
    assert_close(torch.cat([first, rest], 1), full, torch.float32, "prefix + continuation")
    if window is not None:
        assert cache[0].shape[1] == window - 1


def test_route_keeps_top_k():
    logits = torch.tensor([[[1.0, 3.0, 2.0, -1.0]]])
    w = rt.route(logits, 2)
    assert torch.allclose(w, torch.tensor([[[0.0, 0.7311, 0.2689, 0.0]]]), atol=1e-4)
    w2 = rt.route(logits, 2, normalize=False)
    p = logits.softmax(-1)
    assert torch.allclose(w2[..., 1:3], p[..., 1:3]) and w2[..., 0] == 0


def test_init_rules_produce_the_documented_values():
    t = torch.empty(4, 3)
    rt.init_(t, "log_arange", low=1, high=4)
    assert torch.allclose(t[:, 0].exp(), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = torch.empty(1000)
    rt.init_(b, "inv_softplus_log_uniform", low=0.001, high=0.1, floor=1e-4)
    dt = F.softplus(b)
    assert 0.001 * 0.99 <= dt.min() and dt.max() <= 0.1 * 1.01
    z = torch.empty(1000)
    rt.init_(z, "logit_pow_uniform", low=0.9, high=0.999, power=8.0)
    a = torch.sigmoid(z) ** 8
    assert 0.9 - 1e-4 <= a.min() and a.max() <= 0.999 + 1e-4
    r = torch.empty(4)
    rt.init_(r, "decay_range", low=5, high=8)
    assert torch.allclose(r.exp(), 1 - 2.0 ** -torch.tensor([5.0, 6.0, 7.0, 8.0]))


def test_repeat_heads():
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    y = rt.repeat_heads(x, 4, dim=2)
    assert y.shape == (1, 1, 4, 3) and torch.equal(y[0, 0, 1], x[0, 0, 0])
    assert rt.repeat_heads(x, 2, dim=2) is x
    assert ops is not None


def test_partial_rotary_leaves_the_other_dims_alone():
    x = torch.randn(1, 5, 2, 8)
    pos = torch.arange(5)
    y = rt._rope(x, pos, 10000.0, dims=4)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert_close(y[..., :4], ops.apply_rope(x[..., :4], 10000.0, pos), torch.float32, "rotated half")


def test_sampling_checks_its_arguments_and_survives_tiny_temperatures():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 5.0]])
    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": 0},
                {"top_k": -2}, {"top_k": 1.5}):
        args = {"temperature": 1.0, "top_k": None, **bad}
        with pytest.raises(ValueError):
            rt.sample(logits, args["temperature"], args["top_k"])
    # logits / 1e-45 overflow; shifted by their maximum first, the greedy token comes out
    assert rt.sample(logits, 1e-45, None).tolist() == [1, 2]
    assert rt.sample(logits, 0.0, None).tolist() == [1, 2]
    assert rt.sample(logits, 1.0, 1).tolist() == [1, 2]
