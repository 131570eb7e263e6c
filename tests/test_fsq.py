"""Finite scalar quantization (pyvae.finite_scalar_quantize): the reference against
vector-quantize-pytorch's FSQ, every backend against both (codes, indices, gradients), dtypes,
layouts, empty inputs, NaN, bad calls, autograd (gradcheck, higher orders, torch.func), opcheck and
torch.compile, and the GPU-only cases.

Values of z within BOUNDARY_MARGIN of a rounding boundary may round to neighbouring levels on two
backends (tanh differs by an ulp or so, the constants are float32): the comparisons draw z away from
the boundaries (families.fsq.away_from_boundaries); the property tests (test_properties.py) allow
those values one level."""
from __future__ import annotations

import math

import pytest
import torch

import pyvae
from pyvae.kernels.contracts.fsq import dim_constants
from pyvae.ops.fsq import NAN_INDEX, fsq_backward_reference, fsq_reference

from cases import (NATIVE_PAIRS, PAIRS, compile_pairs, interpreted, no_sync_pairs, pair_id, run_with_cpu_isa,
                   skip_unless_available)
from families.fsq import LEVEL_SETS, away_from_boundaries, boundary_distance
from probes import held_bytes, no_host_sync
import transforms

BACKENDS = pyvae.backends.available("cpu", "fsq")
FSQ_PAIRS = [p for p in PAIRS if p[1] in pyvae.backends.available(p[0], "fsq")]
# the four: the FSQ paper's 2^10 and 2^16 codebooks, odd levels, and the symmetric bound
PEER_CASES = LEVEL_SETS[:4]


def fsq(z, levels, backend="auto", **kwargs):
    return pyvae.finite_scalar_quantize(z, levels, backend=backend, **kwargs)


def peer_module(levels, preserve_symmetry):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    return vqp.FSQ(list(levels), preserve_symmetry=preserve_symmetry)


# ------------------------------------------------------------------------------ the definition
@pytest.mark.parametrize("levels,symmetric", PEER_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_is_the_peer_module(levels, symmetric, dtype, gen):
    """fsq_reference against FSQ.quantize and FSQ.codes_to_indices (dim=None: no projection)."""
    peer = peer_module(levels, symmetric)
    z = away_from_boundaries((3, 700, len(levels)), levels, symmetric, scale=2.0, dtype=dtype, generator=gen)
    codes, indices = fsq_reference(z, levels, symmetric)
    peer_codes = peer.quantize(z)
    # the peer writes a symmetric code as 2 / (L - 1) * k - 1 with 2 / (L - 1) a float32 tensor (for
    # float64 z too), pyvae as the correctly rounded (k - c) / c (the same float on every backend):
    # a float32 ulp apart at most
    torch.testing.assert_close(codes, peer_codes, rtol=0, atol=torch.finfo(torch.float32).eps)
    assert torch.equal(indices, peer.codes_to_indices(peer_codes))
    assert indices.dtype == torch.int32 and indices.shape == z.shape[:-1]


@pytest.mark.parametrize("levels,symmetric", PEER_CASES, ids=str)
def test_codes_and_indices_are_the_implicit_codebook(levels, symmetric):
    """Each index's row of the peer's implicit codebook is the row's codes; every level is reached."""
    peer = peer_module(levels, symmetric)
    z = torch.linspace(-6, 6, 4001).unsqueeze(-1).expand(-1, len(levels))
    for device, backend in FSQ_PAIRS:
        codes, indices = fsq(z.to(device), levels, backend, preserve_symmetry=symmetric)
        codes, indices = codes.cpu(), indices.cpu()
        torch.testing.assert_close(peer.implicit_codebook[indices.long()], codes, rtol=0, atol=1.2e-7)
        for j, level in enumerate(levels):
            assert codes[:, j].unique().numel() == level, (backend, j)
        assert indices.min() == 0 and indices.max() == math.prod(levels) - 1


# ------------------------------------------------------------------------------ every backend
@pytest.mark.parametrize("pair", FSQ_PAIRS, ids=pair_id)
@pytest.mark.parametrize("levels,symmetric", PEER_CASES, ids=str)
def test_backends_match_the_peer_module(pair, levels, symmetric, gen):
    """Codes, indices and the straight-through gradient against FSQ's own forward and autograd."""
    device, backend = pair
    peer = peer_module(levels, symmetric)
    z = away_from_boundaries((2, 300 if interpreted(pair) else 1500, len(levels)), levels, symmetric,
                             scale=2.0, generator=gen).requires_grad_()
    upstream = torch.randn(z.shape, generator=gen)
    peer_codes = peer.quantize(z)
    (peer_grad,) = torch.autograd.grad(peer_codes, z, upstream)
    z_here = z.detach().to(device).requires_grad_()
    codes, indices = fsq(z_here, levels, backend, preserve_symmetry=symmetric)
    (grad,) = torch.autograd.grad(codes, z_here, upstream.to(device))
    torch.testing.assert_close(codes.cpu(), peer_codes.detach(), rtol=0, atol=1.2e-7)
    assert torch.equal(indices.cpu(), peer.codes_to_indices(peer_codes.detach()))
    torch.testing.assert_close(grad.cpu(), peer_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pair", FSQ_PAIRS, ids=pair_id)
@pytest.mark.parametrize("levels,symmetric", LEVEL_SETS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backends_match_the_float64_reference(pair, levels, symmetric, dtype, gen):
    device, backend = pair
    z = away_from_boundaries((300, len(levels)), levels, symmetric, dtype=dtype, generator=gen)
    upstream = torch.randn(z.shape, generator=gen).to(dtype)
    z_here = z.to(device).requires_grad_()
    codes, indices = fsq(z_here, levels, backend, preserve_symmetry=symmetric)
    (grad,) = torch.autograd.grad(codes, z_here, upstream.to(device))
    codes, indices, grad = codes.cpu(), indices.cpu(), grad.cpu()
    z64 = z.double()
    expected_codes, expected_indices = fsq_reference(z64, levels, symmetric)
    assert codes.dtype == dtype and grad.dtype == dtype
    # float32 codes are the float64 ones rounded; 16-bit ones rounded once more (to nearest even, but
    # Triton's interpreter truncates to bfloat16: an ulp below, there; on a GPU Triton rounds)
    expected_rounded = expected_codes.float().to(dtype).float()
    if interpreted(pair) and dtype == torch.bfloat16:
        torch.testing.assert_close(codes.float(), expected_rounded, rtol=2**-7, atol=0)
    else:
        assert torch.equal(codes.float(), expected_rounded)
    assert torch.equal(indices, expected_indices)
    expected_grad = fsq_backward_reference(z64, upstream.double(), levels, symmetric)
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol * float(expected_grad.abs().max()))


@pytest.mark.parametrize("pair", FSQ_PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_inputs_match_the_peer_module(pair, dtype, gen):
    """The peer computes 16-bit z in float32 and casts the codes back (force_quantization_f32)."""
    device, backend = pair
    levels = (8, 5, 5, 5)  # codes k / 4 and k / 2: exact in every dtype (the interpreter's bfloat16 too)
    peer = peer_module(levels, False)
    z = away_from_boundaries((1, 400, 4), levels, False, dtype=dtype, generator=gen)
    peer_codes, peer_indices = peer(z)
    codes, indices = fsq(z.to(device), levels, backend)
    assert codes.dtype == peer_codes.dtype == dtype
    assert torch.equal(codes.cpu(), peer_codes) and torch.equal(indices.cpu(), peer_indices)


@pytest.mark.parametrize("pair", FSQ_PAIRS, ids=pair_id)
def test_any_strides_and_leading_dims(pair, gen):
    """Channels-first feature maps moved to channels-last (a transposed view), every other value of a
    wider tensor, rows of a wider tensor, a stride-0 batch: the contiguous result, and its gradient."""
    device, backend = pair
    levels = (8, 5, 5, 5)
    base = away_from_boundaries((2, 3, 5, 4), levels, False, generator=gen).to(device)
    channels_first = base.movedim(-1, 1).contiguous()
    views = {"movedim": channels_first.movedim(1, -1),
             "strided": torch.stack([base, torch.zeros_like(base)], -1)[..., 0],
             "row_padded": torch.cat([base, torch.zeros(2, 3, 5, 3, device=device)], -1)[..., :4],
             "expanded": base[:1].expand(2, 3, 5, 4)}
    for name, view in views.items():
        assert not view.is_contiguous()
        dense = view.contiguous().requires_grad_()
        leaf = view.detach().requires_grad_()
        upstream = torch.randn(view.shape, generator=gen).to(device)
        expected, expected_indices = fsq(dense, levels, backend)
        got, indices = fsq(leaf, levels, backend)
        assert torch.equal(got, expected) and torch.equal(indices, expected_indices), name
        assert indices.shape == (2, 3, 5)
        (g,) = torch.autograd.grad(got, leaf, upstream)
        (e,) = torch.autograd.grad(expected, dense, upstream)
        assert torch.equal(g, e), name


@pytest.mark.parametrize("pair", FSQ_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0, 4), (0, 1)], ids=str)
def test_empty_z(pair, shape):
    device, backend = pair
    levels = (8, 5, 5, 5) if shape[-1] == 4 else (5,)
    z = torch.randn(shape, device=device).requires_grad_()
    codes, indices = fsq(z, levels, backend)
    assert codes.shape == z.shape and indices.shape == z.shape[:-1] and indices.dtype == torch.int32
    (grad,) = torch.autograd.grad(codes, z, torch.ones_like(codes))
    assert grad.shape == z.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_z_is_one_row(backend, gen):
    z = away_from_boundaries((5,), (7, 5, 5, 5, 5), False, generator=gen)
    codes, index = fsq(z, (7, 5, 5, 5, 5), backend)
    expected_codes, expected_index = fsq_reference(z.double(), (7, 5, 5, 5, 5))
    assert index.shape == () and index == expected_index
    torch.testing.assert_close(codes.double(), expected_codes)


@pytest.mark.parametrize("pair", FSQ_PAIRS, ids=pair_id)
def test_many_rows_across_threads_and_tiles(pair, gen):
    """More rows than the CPU kernel's tiles, than one Triton program and one CUDA block, ragged."""
    device, backend = pair
    levels = (8, 8, 8, 6, 5)
    rows = 2000 if interpreted(pair) else 20011
    z = away_from_boundaries((rows, 5), levels, False, generator=gen)
    codes, indices = fsq(z.to(device), levels, backend)
    expected_codes, expected_indices = fsq_reference(z.double(), levels)
    assert torch.equal(codes.cpu(), expected_codes.float()) and torch.equal(indices.cpu(), expected_indices)


# ------------------------------------------------------------------------------ NaN and infinities
@pytest.mark.parametrize("pair", FSQ_PAIRS, ids=pair_id)
@pytest.mark.parametrize("levels,symmetric", [PEER_CASES[0], PEER_CASES[3]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_infinities(pair, levels, symmetric, dtype):
    """A NaN value: a NaN code and the index -1 for its row (the row's other codes as they are);
    +-inf: the outer levels, with gradient 0. The same on every backend."""
    d = len(levels)
    z = torch.zeros(4, d, dtype=dtype)
    z[0, 1] = math.nan
    z[1, :] = math.inf
    z[2, :] = -math.inf
    z[3, 0] = math.nan
    z[3, -1] = -math.inf
    device, backend = pair
    z = z.to(device).requires_grad_()
    codes, indices = fsq(z, levels, backend, preserve_symmetry=symmetric)
    assert codes[0, 1].isnan() and codes[3, 0].isnan() and codes.isnan().sum() == 2
    assert indices[0] == NAN_INDEX and indices[3] == NAN_INDEX
    top = torch.tensor([(level - 1 - c.center) / c.center
                        for level, c in zip(levels, dim_constants(levels, symmetric))])
    assert torch.equal(codes[1].float().cpu(), top) and (codes[2] == -1).all() and codes[3, -1] == -1  # 0.75 for L = 8
    assert indices[1] == math.prod(levels) - 1 and indices[2] == 0
    expected_codes, expected_indices = fsq_reference(z.detach().double().cpu(), levels, symmetric)
    rtol = 2**-7 if interpreted(pair) and dtype == torch.bfloat16 else 0  # the interpreter truncates to bfloat16
    torch.testing.assert_close(codes.double().cpu(), expected_codes.to(dtype).double(), equal_nan=True, rtol=rtol,
                               atol=0)
    assert torch.equal(indices.cpu(), expected_indices)
    (grad,) = torch.autograd.grad(codes, z, torch.ones_like(codes))
    assert grad[0, 1].isnan() and (grad[1:3] == 0).all()


# ------------------------------------------------------------------------------ bad calls
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args,kwargs,error,words", [
    ((torch.zeros(3, 4, dtype=torch.int64), (8, 5, 5, 5)), {}, TypeError, "z must be a floating tensor"),
    (([0.5, 0.1, 0.2, 0.3], (8, 5, 5, 5)), {}, TypeError, "z must be a torch.Tensor, got list"),
    ((torch.zeros(3, 5), (8, 5, 5, 5)), {}, ValueError,
     "z must have len(levels) = 4 values in its last dim, got shape (3, 5)"),
    ((torch.zeros(()), (8,)), {}, ValueError, "z must have len(levels) = 1 values in its last dim, got shape ()"),
    ((torch.zeros(3, 4), ()), {}, ValueError, "levels must not be empty"),
    ((torch.zeros(3, 4), (8, 5, 1, 5)), {}, ValueError, "levels must each be >= 2, got [8, 5, 1, 5]"),
    ((torch.zeros(3, 3), (2, 3, 4)), {}, ValueError, "levels of 2 need preserve_symmetry=True, got [2, 3, 4]"),
    ((torch.zeros(3, 3), (2048, 1024, 1024)), {}, ValueError, "levels must multiply to less than 2^31"),
    ((torch.zeros(3, 2), (8.0, 5)), {}, TypeError, "levels must be a sequence of ints"),
    ((torch.zeros(3, 2), (True, 5)), {}, TypeError, "levels must be a sequence of ints"),
    ((torch.zeros(3, 2), "85"), {}, TypeError, "levels must be a sequence of ints (e.g. [8, 5, 5, 5]), got str"),
    ((torch.zeros(3, 2), 8), {}, TypeError, "levels must be a sequence of ints (e.g. [8, 5, 5, 5]), got int"),
    ((torch.zeros(3, 2), (8, 5)), {"preserve_symmetry": 1}, TypeError, "preserve_symmetry must be a bool"),
])
def test_bad_arguments_are_named_the_same_on_every_backend(backend, args, kwargs, error, words):
    with pytest.raises(error) as raised:
        fsq(*args, backend=backend, **kwargs)
    assert words in str(raised.value)


def test_unknown_backend_and_float64_off_the_torch_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        fsq(torch.zeros(3, 4), (8, 5, 5, 5), backend="numpy")
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        fsq(torch.zeros(3, 4, dtype=torch.float64), (8, 5, 5, 5), backend=BACKENDS[0])
    codes, _ = fsq(torch.zeros(3, 4, dtype=torch.float64), (8, 5, 5, 5), backend="torch")
    assert codes.dtype == torch.float64


def test_levels_of_any_integer_type(gen):
    import numpy as np

    z = torch.randn(6, 3, generator=gen)
    expected = fsq(z, (8, 5, 5))
    for levels in ([8, 5, 5], np.array([8, 5, 5]), (np.int64(8), 5, 5), torch.Size([8, 5, 5])):
        if isinstance(levels, np.ndarray):
            levels = list(levels)
        got = fsq(z, levels)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------------------ memory and autograd
@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_optional_and_backward_keeps_only_z(backend, gen):
    z = torch.randn(2048, 4, generator=gen).requires_grad_()
    codes, indices = fsq(z, (8, 5, 5, 5), backend, return_indices=False)
    assert indices is None
    assert torch.equal(codes, fsq(z, (8, 5, 5, 5), backend)[0])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        codes, _ = fsq(z, (8, 5, 5, 5), backend)
    assert len(saved) == 1 and saved[0] is z
    if backend != "torch":  # the outputs only: codes (z's size) and indices (a quarter of it)
        kept = []
        held = held_bytes(lambda: kept.append(fsq(z, (8, 5, 5, 5), backend)))
        assert held <= z.numel() * 4 * 1.25 + 1024, held


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_flows_where_none_is_asked(backend, gen):
    z = torch.randn(5, 4, generator=gen).requires_grad_()
    codes, indices = fsq(z, (8, 5, 5, 5), backend)
    assert not indices.requires_grad
    (grad,) = torch.autograd.grad(codes.sum() + 0 * indices.sum(), z)  # the indices contribute nothing
    expected = fsq_backward_reference(z.detach().double(), torch.ones(5, 4, dtype=torch.float64), (8, 5, 5, 5))
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("levels,symmetric", [PEER_CASES[0], PEER_CASES[3]], ids=str)
def test_gradcheck_float64_reference(levels, symmetric, gen):
    """The straight-through gradient has a derivative of its own (to z and to the upstream
    gradient): gradcheck of the first-order gradient checks the second order, gradgradcheck the
    third. (The codes themselves are piecewise constant: no finite difference sees the STE.)"""
    z = torch.randn(3, len(levels), dtype=torch.float64, generator=gen).requires_grad_()
    upstream = torch.randn(3, len(levels), dtype=torch.float64, generator=gen).requires_grad_()

    def first_order(z, g):
        codes, _ = fsq(z, levels, "torch", preserve_symmetry=symmetric)
        return torch.autograd.grad(codes, z, g, create_graph=True)[0]

    assert torch.autograd.gradcheck(first_order, (z, upstream))
    assert torch.autograd.gradgradcheck(first_order, (z, upstream))
    consts = dim_constants(levels, symmetric)
    shift = torch.tensor([c.shift for c in consts], dtype=torch.float64)
    scale = torch.tensor([c.grad_scale for c in consts], dtype=torch.float64)
    expected = upstream * (1 - torch.tanh(z + shift) ** 2) * scale  # the formula
    torch.testing.assert_close(first_order(z, upstream), expected, rtol=1e-12, atol=1e-12)


def _fsq_case(levels, symmetric):
    def fn(backend, z):
        return fsq(z, levels, backend, preserve_symmetry=symmetric)[0]
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_gradients_match_reference(backend, gen):
    levels = (8, 5, 5, 5)
    z = away_from_boundaries((6, 4), levels, False, generator=gen)
    transforms.assert_second_order_matches_reference(_fsq_case(levels, False), backend, [z])


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_transforms_match_loop(backend, gen):
    levels = (2, 3, 4)
    z = away_from_boundaries((3, 5, 3), levels, True, generator=gen)  # vmap over 3 slices of [5, 3]
    transforms.assert_func_transforms_match_loop(_fsq_case(levels, True), backend, [z])


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_cpu_simd_paths(isa, tmp_path):
    """Every SIMD path of the CPU kernel (forced by PYVAE_CPU_ISA) gives the reference's codes,
    indices (with a NaN row) and gradient."""
    script = (
        "import torch, pyvae, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from families.fsq import LEVEL_SETS, away_from_boundaries\n"
        "from pyvae.ops.fsq import fsq_reference, fsq_backward_reference\n"
        "for levels, sym in LEVEL_SETS:\n"
        "    z = away_from_boundaries((1001, len(levels)), levels, sym, generator=torch.Generator().manual_seed(1))\n"
        "    z[7, 0] = float('nan')\n"
        "    c, i = pyvae.finite_scalar_quantize(z, levels, preserve_symmetry=sym, backend='cpu')\n"
        "    rc, ri = fsq_reference(z.double(), levels, sym)\n"
        "    assert torch.equal(c.isnan(), rc.isnan()) and torch.equal(c[~c.isnan()], rc.float()[~c.isnan()])\n"
        "    assert torch.equal(i, ri) and i[7] == -1, levels\n"
        "    g = torch.ops.pyvae.fsq_backward(z, torch.ones_like(z), list(levels), sym)\n"
        "    rg = fsq_backward_reference(z.double(), torch.ones_like(z).double(), levels, sym)\n"
        "    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-7, equal_nan=True)\n"
        "print('ok')\n")
    import os
    out = run_with_cpu_isa(isa, script, tmp_path, os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ------------------------------------------------------------------------------ registration, compile
def _ops(backend):
    suffix = "_triton" if backend == "triton" else ""
    return getattr(torch.ops.pyvae, f"fsq_forward{suffix}"), getattr(torch.ops.pyvae, f"fsq_backward{suffix}")


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
def test_opcheck(pair, gen):
    device, backend = pair
    skip_unless_available(pair, "fsq")
    forward, backward = _ops(backend)
    checks = {}
    if backend == "triton" and device == "cpu":
        # Triton's interpreter runs kernels even on fake tensors, so the fake-tensor checks need a GPU.
        checks = {"test_utils": ("test_schema", "test_autograd_registration")}
    for levels, symmetric in PEER_CASES:
        z = away_from_boundaries((6, len(levels)), levels, symmetric, generator=gen).to(device)
        for want in (True, False):
            torch.library.opcheck(forward, (z, list(levels), symmetric, want), **checks)
        torch.library.opcheck(backward, (z, torch.randn_like(z), list(levels), symmetric), **checks)


@pytest.mark.parametrize("pair", compile_pairs("fsq"), ids=pair_id)
def test_compiles_in_bounded_time_without_recompiles(pair):
    device, backend = pair
    skip_unless_available(pair, "fsq")

    def make(size):
        return [away_from_boundaries((size + 2, 5, 4), (8, 5, 5, 5), False).to(device)]

    transforms.assert_compiles_once(_fsq_case((8, 5, 5, 5), False), backend, make, dynamic=True)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
def test_torch_compile_fullgraph_matches_eager(backend, gen):
    levels = (8, 8, 8, 6, 5)

    def step(z):
        codes, indices = fsq(z, levels, backend)
        return (codes * codes.sin()).sum(), indices

    compiled = torch.compile(step, fullgraph=True)
    z = away_from_boundaries((64, 5), levels, False, generator=gen)
    leaf_eager, leaf_compiled = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss, indices = step(leaf_eager)
    loss.backward()
    loss_c, indices_c = compiled(leaf_compiled)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    assert torch.equal(indices_c, indices)
    torch.testing.assert_close(leaf_compiled.grad, leaf_eager.grad)


# ------------------------------------------------------------------------------ GPU only
@pytest.mark.parametrize("pair", no_sync_pairs("fsq"), ids=pair_id)
def test_no_host_sync(pair, gen):
    """Forward (with and without indices) and backward without a host synchronisation; then what they
    computed, against the float64 reference."""
    skip_unless_available(pair, "fsq")
    device, backend = pair
    levels = (8, 8, 8, 6, 5)
    z = away_from_boundaries((4097, 5), levels, False, generator=gen).to(device).requires_grad_()
    upstream = torch.randn(z.shape, generator=gen).to(device)
    fsq(z, levels, backend)  # compile outside the check
    with no_host_sync(device):
        codes, indices = fsq(z, levels, backend)
        fsq(z, levels, backend, return_indices=False)
        (grad,) = torch.autograd.grad(codes, z, upstream)
    expected_codes, expected_indices = fsq_reference(z.detach().double().cpu(), levels)
    assert torch.equal(codes.cpu(), expected_codes.float()) and torch.equal(indices.cpu(), expected_indices)
    expected_grad = fsq_backward_reference(z.detach().double().cpu(), upstream.double().cpu(), levels)
    torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=2e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference_at_scale(backend, dtype, gen):
    """A million rows of every level set (one Triton kernel per set), NaN rows, on the GPU."""
    if backend not in pyvae.backends.available("cuda", "fsq"):
        pytest.skip(f"{backend} not available")
    for levels, symmetric in LEVEL_SETS:
        z = away_from_boundaries((1 << 20, len(levels)), levels, symmetric, dtype=dtype, generator=gen)
        z[5, 0] = math.nan
        codes, indices = fsq(z.cuda(), levels, backend, preserve_symmetry=symmetric)
        expected_codes, expected_indices = fsq_reference(z.double(), levels, symmetric)
        torch.testing.assert_close(codes.cpu(), expected_codes.to(dtype), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(indices.cpu(), expected_indices) and indices[5] == NAN_INDEX


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_replay(backend, gen):
    """Forward and backward captured in a CUDA graph (no host copies of the levels: they are kernel
    parameters / compile-time constants) replay on fresh values."""
    if backend not in pyvae.backends.available("cuda", "fsq"):
        pytest.skip(f"{backend} not available")
    levels = (8, 5, 5, 5)
    z = torch.zeros(4096, 4, device="cuda", requires_grad=True)
    upstream = torch.ones(4096, 4, device="cuda")

    def step():
        codes, indices = fsq(z, levels, backend)
        return codes, indices, torch.autograd.grad(codes, z, upstream)[0]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (compile, allocate)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes, indices, grad = step()
    fresh = away_from_boundaries((4096, 4), levels, False, generator=gen)
    with torch.no_grad():
        z.copy_(fresh.cuda())
    graph.replay()
    expected_codes, expected_indices = fsq_reference(fresh.double(), levels)
    assert torch.equal(codes.cpu(), expected_codes.float()) and torch.equal(indices.cpu(), expected_indices)
    torch.testing.assert_close(grad.cpu().double(), fsq_backward_reference(fresh.double(), upstream.double().cpu(),
                                                                          levels), rtol=2e-6, atol=1e-7)


def test_boundary_helper_finds_the_boundaries():
    """The tests' own helper: z exactly at a boundary is distance 0, and the draw avoids them."""
    levels = (8,)
    c = dim_constants(levels, False)[0]
    at_boundary = math.atanh((2.5 + c.offset) / c.scale) - c.shift  # bounded value 2.5: between two levels
    assert boundary_distance(torch.tensor([[at_boundary]], dtype=torch.float64), levels, False).item() < 1e-12
    z = away_from_boundaries((10000, 1), levels, False)
    assert (boundary_distance(z, levels, False) >= 1e-4).all()
