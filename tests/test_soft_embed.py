"""soft_embed: forward and gradients of every backend against the spec formula."""
import pytest
import torch

import evofast
from evofast.ops import soft_embed
from evofast.ops.reference import soft_embed_spec


def make(V=50, d=16, shape=(2, 5), J=4, dtype=torch.float32, seed=0, negative=True, zero_rows=True):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g).to(dtype)
    ids = torch.randint(0, V, shape + (J,), generator=g)
    w = torch.rand(shape + (J,), generator=g, dtype=torch.float64)
    if negative:
        w[..., 0] -= 0.3                      # some negative weights: clamped to 0
    if zero_rows:
        w.view(-1, J)[0] = 0.0                # an all-zero row: the 1e-12 floor
    w.view(-1, J)[-1] = torch.tensor([0.0] * (J - 1) + [1.0], dtype=w.dtype)  # one-hot ([Decode])
    return weight, ids, w


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,d,shape,J", [(50, 16, (2, 5), 4), (1000, 123, (3, 7), 17), (126464, 8, (1, 3), 4)])
def test_forward_matches_spec(fused, dtype, V, d, shape, J):
    """Close to the float64 formula. In fp16 the formula's 1e-12 floor rounds to 0, so a row whose
    weights are all <= 0 gives 0 / 0 = NaN, as the authors' model computes it in fp16."""
    name, dev = fused
    weight, ids, w = make(V, d, shape, J, dtype)
    w = w.to(dtype)
    ref = soft_embed_spec(weight.double(), ids, w.double())
    if dtype == torch.float16:
        ref[w.clamp_min(0).sum(-1) == 0] = float("nan")
    for backend, device in (("torch", torch.device("cpu")), (name, dev)):
        got = soft_embed(weight.to(device), ids.to(device), w.to(device), backend=backend)
        assert got.dtype == dtype and got.shape == shape + (d,)
        torch.testing.assert_close(got.cpu().double(), ref, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_spec_autograd(fused, dtype):
    name, dev = fused
    weight, ids, w = make(300, 24, (3, 6), 4, dtype, seed=1)
    w = w.to(dtype)
    gout = torch.randn(3, 6, 24, generator=torch.Generator().manual_seed(2))
    wr, wwr = weight.double().requires_grad_(), w.double().requires_grad_()
    soft_embed_spec(wr, ids, wwr).backward(gout.double())
    wg = weight.to(dev).requires_grad_()
    wwg = w.to(dev).requires_grad_()
    soft_embed(wg, ids.to(dev), wwg, backend=name).backward(gout.to(dev, dtype))
    assert wg.grad.dtype == dtype and wwg.grad.dtype == dtype
    torch.testing.assert_close(wg.grad.cpu().double(), wr.grad, **TOL[dtype])
    torch.testing.assert_close(wwg.grad.cpu().double(), wwr.grad, **TOL[dtype])


@pytest.mark.parametrize("which", ["weight", "w"])
def test_backward_only_one_input(fused, which):
    name, dev = fused
    weight, ids, w = make(dtype=torch.float32, seed=3)
    weight, w = weight.to(dev), w.float().to(dev)
    (weight if which == "weight" else w).requires_grad_()
    out = soft_embed(weight, ids.to(dev), w, backend=name)
    out.sum().backward()
    assert (weight.grad is None) == (which == "w") and (w.grad is None) == (which == "weight")


@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_gradcheck_float64(name):
    if name not in evofast.ops.backends():
        pytest.skip(f"{name} not usable here")
    dev = torch.device("cuda" if (name == "triton" and torch.cuda.is_available()) else "cpu")
    weight, ids, w = make(V=12, d=5, shape=(2, 3), J=3, dtype=torch.float64, seed=4, zero_rows=False)
    # keep weights away from 0 (clamp kink) so finite differences are smooth
    w = torch.where(w.abs() < 0.05, w + 0.1, w)
    weight = weight.to(dev).requires_grad_()
    w = w.to(dev).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: soft_embed(a, ids.to(dev), b, backend=name), (weight, w))


def test_repeated_ids_accumulate(fused):
    name, dev = fused
    weight = torch.randn(10, 4)
    ids = torch.full((1, 5, 3), 7)
    w = torch.ones(1, 5, 3)
    wg = weight.to(dev).requires_grad_()
    soft_embed(wg, ids.to(dev), w.to(dev), backend=name).sum().backward()
    expect = torch.zeros(10, 4)
    expect[7] = 5.0
    torch.testing.assert_close(wg.grad.cpu(), expect)


def _bad():
    weight, ids, w = make()
    yield "weight", (weight[0], ids, w)
    yield "weight", (weight.long(), ids, w)
    yield "ids", (weight, ids.float(), w)
    yield "ids", (weight, ids + 100, w)
    yield "ids", (weight, ids - 100, w)
    yield "w", (weight, ids, w[..., :-1])
    yield "w", (weight, ids, w.long())
    yield "weight", (weight.to("meta"), ids, w)
    yield "w", (weight, ids, w.to("meta"))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("arg,args", list(_bad()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(arg, args, backend):
    """A ValueError whose message starts with the argument's name."""
    if backend not in evofast.ops.backends():
        pytest.skip(f"{backend} not usable here")
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        soft_embed(*args, backend=backend)


def test_unknown_backend_is_named():
    weight, ids, w = make()
    with pytest.raises(ValueError, match=r"^backend:"):
        soft_embed(weight, ids, w, backend="foo")


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_opcheck(name):
    if name not in evofast.ops.backends():
        pytest.skip(f"{name} not built")
    weight, ids, w = make(dtype=torch.float32, seed=5)
    w = w.float()
    torch.library.opcheck(torch.ops.evofast.soft_embed_fwd.default, (weight, ids, w, name))
    grad = torch.randn(2, 5, 16)
    torch.library.opcheck(torch.ops.evofast.soft_embed_bwd.default, (grad, weight, ids, w, True, True, name))
    torch.library.opcheck(torch.ops.evofast.soft_embed_bwd.default, (grad, weight, ids, w, False, True, name))


def test_torch_compile_forward_backward():
    weight, ids, w = make(dtype=torch.float32, seed=6)
    w = w.float()

    def f(weight, w):
        return (soft_embed(weight, ids, w) * 3).sum()

    a, b = weight.clone().requires_grad_(), w.clone().requires_grad_()
    f(a, b).backward()
    c, d = weight.clone().requires_grad_(), w.clone().requires_grad_()
    torch.compile(f, backend="aot_eager")(c, d).backward()
    torch.testing.assert_close(a.grad, c.grad)
    torch.testing.assert_close(b.grad, d.grad)
