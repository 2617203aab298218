"""evofast.ops.linear_cross_entropy against F.cross_entropy(F.linear(...)): values and gradients,
ignored rows, chunking, the logits hook, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from evofast.ops import linear_cross_entropy


def _case(N=37, d=24, V=123, seed=0, dtype=torch.float32, bias=False, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype) * 0.5
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    return h, w, b, labels


def _reference(h, w, b, labels, scale, reduction):
    logits = F.linear(h, w, b).float() * scale
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("bias,scale,reduction", [(False, None, "mean"), (True, 0.125, "mean"), (True, 2.0, "sum")])
def test_values_and_gradients_match_cross_entropy(chunk, bias, scale, reduction):
    h, w, b, labels = _case(bias=bias)
    leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None, scale=scale,
                               reduction=reduction, chunk_size=chunk)
    ref = _reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, labels,
                     1.0 if scale is None else scale, reduction)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out * 1.7).backward()
    (ref * 1.7).backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)


def test_ignored_rows_get_zero_gradient_and_frozen_weight_none():
    h, w, _, labels = _case(N=20, ignore_frac=0.5)
    h.requires_grad_()
    out = linear_cross_entropy(h, w, labels, chunk_size=3)
    out.backward()
    assert w.grad is None
    ignored = labels == -100
    assert ignored.any() and bool((h.grad[ignored] == 0).all())
    assert bool((h.grad[~ignored].abs().sum(-1) > 0).all())


def test_all_ignored_is_nan_like_cross_entropy_and_no_grad_path():
    h, w, _, labels = _case(N=6)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, labels))
    _, _, _, labels = _case(N=37)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h.new_ones(37, 24), w, labels),
                                   _reference(h.new_ones(37, 24), w, None, labels, 1.0, "mean"))


def test_bf16_close_to_fp32_reference():
    h, w, _, labels = _case(N=16, d=32, V=64)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16()
    out = linear_cross_entropy(hb, wb, labels, chunk_size=4)
    out.backward()
    hr = h.bfloat16().requires_grad_()
    ref = _reference(hr, wb, None, labels, 1.0, "mean")
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hb.grad.float(), hr.grad.float(), rtol=2e-2, atol=2e-3)


def test_hook_sees_every_block_once_in_order():
    h, w, b, labels = _case(N=23, bias=True)
    seen = []

    def hook(s, e, block):
        seen.append((s, e))
        torch.testing.assert_close(block, (F.linear(h[s:e], w, b) * 0.5).float())

    linear_cross_entropy(h, w, labels, bias=b, scale=0.5, chunk_size=7, on_logits=hook)
    assert seen == [(0, 7), (7, 14), (14, 21), (21, 23)]


def test_bad_input_names_the_argument():
    h, w, _, labels = _case(N=5)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, labels[:4])
    bad = labels.clone()
    bad[0] = 10_000
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(h[:, :3], w, labels)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, labels, chunk_size=0)
