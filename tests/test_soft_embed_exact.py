"""soft_embed's forward is the authors' formula bit for bit, in the model's dtype.

The authors' model mixes its input embedding as

    p = w.clamp_min(0)
    x = (p / p.sum(-1, keepdim=True).clamp_min(1e-12)).unsqueeze(-1) * E[ids]).sum(-2)

in the model dtype. On a sharp model one ulp of that input changes a later
revision, so every backend must give these bits exactly, not merely close
values (`torch.equal` on the bit patterns; NaN positions compared apart).

The torch and cpp backends sum with torch's own reduction, so they match for
every width. The triton and cuda kernels sum in order j = 0..J-1, which is what
torch's CPU reduction does for J <= 4 at any width and for J <= 17 when the width
is a multiple of its vector block (64 covers AVX2 and AVX-512): the interpreted
Triton runs are checked there; on a GPU both are checked against torch on the GPU.
"""
import pytest
import torch

from conftest import FUSED, skip_unless_usable
from evofast.ops import soft_embed
from evofast.ops.reference import soft_embed_spec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}


@pytest.fixture(params=("torch",) + FUSED)
def backend(request):
    """(name, device) of every backend usable here, the torch reference included."""
    if request.param == "torch":
        return "torch", torch.device("cpu")
    return request.param, skip_unless_usable(request.param)


def authors_formula(weight, ids, w):
    return soft_embed_spec(weight, ids, w).to(weight.dtype)


def assert_same_bits(got, want, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
    g, w = got[~nan].view(INT_VIEW[got.dtype]), want[~nan].view(INT_VIEW[want.dtype])
    bad = (g != w).nonzero().flatten()
    assert bad.numel() == 0, f"{what}: {bad.numel()} of {g.numel()} values differ, first at flat {bad[:5].tolist()}"


def soft_weights(shape, k, dtype, seed):
    """What evo_step hands the model (top-k probabilities in descending order, a mask weight
    on about half the rows, normalised in float64, cast to the model dtype), with exact
    ties, zeros, [Decode] one-hot rows, negative weights and an all-zero row mixed in."""
    g = torch.Generator().manual_seed(seed)
    tp = (torch.rand(shape + (k,), generator=g, dtype=torch.float64) ** 4).sort(-1, descending=True).values
    masked = torch.rand(shape, generator=g, dtype=torch.float64) < 0.5
    e = torch.where(masked, tp.sum(-1) / 0.3 * 0.7, torch.zeros(shape, dtype=torch.float64))
    w = torch.cat([tp, e[..., None]], -1)
    w = w / w.sum(-1, keepdim=True)
    rows = w.view(-1, k + 1)
    rows[1::4, 1] = rows[1::4, 0]                  # exact ties
    rows[2::5, k - 1] = 0.0                        # zeros
    rows[3::6] = 0.0
    rows[3::6, -1] = 1.0                           # [Decode]: weight 1 on x
    rows[4::7, 0] = -rows[4::7, 0]                 # negative weights are clamped to 0
    rows[0] = 0.0                                  # all zero: the 1e-12 floor (NaN in fp16)
    return w.to(dtype)


def run(backend, weight, ids, w):
    name, dev = backend
    got = soft_embed(weight.to(dev), ids.to(dev), w.to(dev), backend=name)
    want = authors_formula(weight.to(dev), ids.to(dev), w.to(dev))   # torch on the backend's device
    return got.cpu(), want.cpu()


def summed_in_torch_order(backend, d, J):
    """Where the in-order kernels (triton, cuda) can equal torch's CPU reduction."""
    name, dev = backend
    return name in ("torch", "cpp") or dev.type != "cpu" or J <= 4 or d % 64 == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 37])
def test_forward_is_the_formula_bit_for_bit(backend, dtype, d):
    g = torch.Generator().manual_seed(d)
    weight = torch.randn(500, d, generator=g).to(dtype)
    for k in range(1, 17):
        if not summed_in_torch_order(backend, d, k + 1):
            continue
        ids = torch.randint(0, 500, (3, 5, k + 1), generator=g)
        ids.view(-1, k + 1)[5::9, 1] = ids.view(-1, k + 1)[5::9, 0]   # a repeated id
        w = soft_weights((3, 5), k, dtype, seed=k)
        assert_same_bits(*run(backend, weight, ids, w), f"{backend[0]} {dtype} d={d} k_soft={k}")


def test_forward_bit_for_bit_llada_vocabulary(backend):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(126464, 64, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 126464, (4, 9, 4), generator=g)
    ids[0, 0] = torch.tensor([0, 126463, 126336, 126335])
    w = soft_weights((4, 9), 3, torch.bfloat16, seed=3)
    assert_same_bits(*run(backend, weight, ids, w), backend[0])


@pytest.mark.parametrize("w_dtype,weight_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.float32),
                                                  (torch.bfloat16, torch.float32)], ids=str)
def test_forward_mixed_dtypes_is_the_promoted_formula(backend, w_dtype, weight_dtype):
    """w and weight of different dtypes: the formula in the promoted dtype, cast to weight's."""
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(200, 64, generator=g).to(weight_dtype)
    ids = torch.randint(0, 200, (2, 6, 4), generator=g)
    w = soft_weights((2, 6), 3, w_dtype, seed=5)
    assert_same_bits(*run(backend, weight, ids, w), f"{w_dtype} weights, {weight_dtype} embedding")


def test_empty_soft_token_axis_gives_zeros(backend):
    name, dev = backend
    weight = torch.randn(10, 8, device=dev)
    ids = torch.zeros(3, 0, dtype=torch.long, device=dev)
    out = soft_embed(weight, ids, torch.zeros(3, 0, device=dev), backend=name)
    assert out.shape == (3, 8) and torch.equal(out.cpu(), torch.zeros(3, 8))
