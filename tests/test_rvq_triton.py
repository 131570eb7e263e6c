"""The GPU residual searches on their own: the Triton kernel (kernels/rvq.py,
torch.ops.pyvae.residual_code_triton; on a CPU in Triton's interpreter, so small shapes) and, on a
GPU, the CUDA kernel (csrc/cuda/rvq.cu): every place the residual lives (Triton: registers up to
MAX_RESIDENT_DIM columns, a scratch beyond; CUDA: shared memory up to 352 columns, recomputed
beyond), ties, rows without a finite distance, mixed dtypes and layouts, the bfloat16 rounding of
the quantized sum; every output checked against the contract by families.rvq.check_residual_search."""
from __future__ import annotations

import pytest
import torch

import pyvae

from families.rvq import check_residual_search

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("triton", "cuda") if b in pyvae.backends.available(DEVICE, "rvq")]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="needs a GPU backend of rvq (triton runs interpreted on a CPU)")


@pytest.fixture(params=BACKENDS)
def code(request):
    """residual_code of one GPU backend: (x, codebooks, exact=True) -> (idx, dist, quantized)."""
    op = pyvae.backends.plain_op("rvq", "residual_code", request.param)
    return lambda x, codebooks, exact=True: op(x, codebooks, exact)


def stage_codebooks(q, k, d, dtype=torch.float32):
    """Later stages at smaller scales, as trained residual codebooks are."""
    return (torch.randn(q, k, d, device=DEVICE) / torch.arange(1, q + 1, device=DEVICE)[:, None, None]).to(dtype)


@pytest.mark.parametrize("n,q,k,d", [
    (1, 1, 1, 1), (70, 3, 65, 20), (33, 2, 64, 64), (40, 4, 70, 128),  # residual in registers
    (65, 3, 90, 129), (20, 2, 33, 300),  # in the scratch: several 32-column chunks, a ragged last one
    (9, 2, 20, 1000),  # CUDA: too wide for shared memory
])
@pytest.mark.parametrize("exact", [True, False])
def test_every_residual_place(code, n, q, k, d, exact):
    torch.manual_seed(n + d)
    x, codebooks = torch.randn(n, d, device=DEVICE), stage_codebooks(q, k, d)
    idx, dist, quantized = code(x, codebooks, exact)
    check_residual_search(x, codebooks, idx, dist, quantized)
    again = code(x, codebooks, exact)
    assert all(torch.equal(a, b) for a, b in zip((idx, dist, quantized), again)), "not deterministic"


def test_the_triton_residual_stays_in_registers_up_to_its_limit():
    pytest.importorskip("triton")
    from pyvae.kernels.rvq import MAX_RESIDENT_DIM, residual_config
    assert [residual_config(d).resident for d in (1, 20, MAX_RESIDENT_DIM, MAX_RESIDENT_DIM + 1, 300)] == \
        [True, True, True, False, False]


DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float16),
               (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,cb_dtype", DTYPE_PAIRS,
                         ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPE_PAIRS])
@pytest.mark.parametrize("d", [7, 200])
def test_mixed_dtypes(code, x_dtype, cb_dtype, d):
    torch.manual_seed(d)
    x, codebooks = torch.randn(50, d, device=DEVICE).to(x_dtype), stage_codebooks(3, 40, d, cb_dtype)
    check_residual_search(x, codebooks, *code(x, codebooks))


@pytest.mark.parametrize("d", [5, 150])
def test_ties_go_to_the_lowest_code(code, d):
    # Twins of code 3 in the same code tile (40) and in the next one (70): rows equal to code 3
    # must take 3, at distance 0, and then every twin of a stage's zero code ties too.
    torch.manual_seed(d)
    codebooks = stage_codebooks(2, 90, d)
    codebooks[:, 40] = codebooks[:, 3]
    codebooks[:, 70] = codebooks[:, 3]
    codebooks[1, 10] = 0.0
    codebooks[1, 60] = 0.0
    x = torch.randn(20, d, device=DEVICE)
    x[::2] = codebooks[0, 3]
    idx, dist, quantized = code(x, codebooks)
    check_residual_search(x, codebooks, idx, dist, quantized)
    assert (idx[::2, 0] == 3).all() and (dist[::2, 0] == 0).all()
    assert (idx[::2, 1] == 10).all(), "a zero residual's nearest code is the first zero code"


@pytest.mark.parametrize("d", [6, 140])
def test_rows_without_a_finite_distance_keep_code_0(code, d):
    torch.manual_seed(d)
    codebooks = stage_codebooks(3, 20, d)
    x = torch.randn(9, d, device=DEVICE)
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    x[7, d - 1] = -float("inf")
    idx, dist, quantized = code(x, codebooks)
    check_residual_search(x, codebooks, idx, dist, quantized)
    for row, value in ((1, float("nan")), (4, float("inf")), (7, float("inf"))):
        assert (idx[row] == 0).all(), row
        assert dist[row].isnan().all() if value != value else (dist[row] == value).all(), row
    finite = [r for r in range(9) if r not in (1, 4, 7)]
    assert dist[finite].isfinite().all()


def test_codebook_layouts_and_leading_dims(code):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 30, device=DEVICE)[..., :24]  # rows 30 apart, read in place
    shared = torch.randn(1, 30, 24, device=DEVICE).expand(4, 30, 24)  # one codebook for every stage
    idx, dist, quantized = code(x, shared)
    assert idx.shape == dist.shape == (3, 5, 4) and quantized.shape == x.shape
    check_residual_search(x, shared, idx, dist, quantized)
    transposed = stage_codebooks(2, 24, 30).transpose(1, 2)  # [2, 30, 24], column stride 30
    check_residual_search(x, transposed, *code(x, transposed))


def test_empty_batch_and_empty_rows(code):
    codebooks = stage_codebooks(2, 3, 4)
    idx, dist, quantized = code(torch.randn(0, 4, device=DEVICE), codebooks)
    assert idx.shape == dist.shape == (0, 2) and quantized.shape == (0, 4)
    # D = 0: every code is at distance 0, so code 0 at every stage
    idx, dist, quantized = code(torch.randn(5, 0, device=DEVICE), torch.randn(2, 3, 0, device=DEVICE))
    assert (idx == 0).all() and (dist == 0).all() and quantized.shape == (5, 0)


def test_bfloat16_quantized_rounds_to_nearest_even(code):
    # One code per stage, so quantized is the float32 sum of known values rounded to bfloat16: values
    # half-way between two bfloat16 numbers (ties to even, both directions), just past half-way, the
    # largest float32 (rounds to inf), and a NaN code (a row with no finite distance keeps code 0).
    ulp = 2.0 ** -7
    values = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 + 2.0 ** -20,
                           torch.finfo(torch.float32).max, 2.0 ** -130, 0.0, float("nan")], device=DEVICE)
    codebooks = values.reshape(1, 1, -1)
    x = torch.zeros(3, values.numel(), device=DEVICE, dtype=torch.bfloat16)
    idx, dist, quantized = code(x, codebooks)
    torch.testing.assert_close(quantized, values.to(torch.bfloat16).expand(3, -1), rtol=0, atol=0, equal_nan=True)
    assert quantized[0, :2].float().tolist() == [1.0, 1 + 2 * ulp] and quantized[0, 4].isinf()
