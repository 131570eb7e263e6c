"""pyvae.reparameterize_kl_packed (the packed ops: one [..., 2, Z] tensor in, its gradient in one
tensor out, the log-variance clamped inside the kernel) on every backend, against the chunked
call of pyvae.reparameterize_kl on the same backend and against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyvae
from pyvae.ops.reparam_kl import reparameterize_kl_reference

from cases import DTYPES, NATIVE_PAIRS, PAIRS, REDUCTIONS, compile_pairs, pair_id, randn
from tolerances import SUM, VALUE, assert_close_scaled, noise_scale
from pyvae.ops.reparam_kl import reference_eps
import transforms

BOUNDS = [(None, None), (-30.0, 20.0), (-0.5, None), (None, 0.25)]


def chunked(params, dim, bounds, backend, seed=11, reduction="per_sample"):
    """The same call spelled with chunk, torch.clamp and reparameterize_kl on [rows, cols] views."""
    mu, logvar = params.chunk(2, dim)
    if bounds != (None, None):
        logvar = logvar.clamp(*bounds)
    rows = math.prod(params.shape[:dim])
    z, kl = pyvae.reparameterize_kl(mu.reshape(rows, -1), logvar.reshape(rows, -1), seed=seed, backend=backend,
                                    reduction="none" if reduction == "none" else "per_sample")
    if reduction == "none":
        kl = kl.view(mu.shape)
    elif reduction == "per_sample":
        kl = kl.view(params.shape[:dim])
    else:
        kl = pyvae.ops.reduce_rows(kl, reduction, mu.numel())
    return z.view(mu.shape), kl


def grads_of(fn, params, gen_seed=3):
    """(z, kl, d/dparams of <z, gz> + <kl, gkl>) for fixed random upstream gradients."""
    leaf = params.detach().requires_grad_()
    z, kl = fn(leaf)
    gen = torch.Generator().manual_seed(gen_seed)
    gz = torch.randn(z.shape, generator=gen).to(z.dtype)
    gkl = torch.randn(kl.shape, generator=gen).to(kl.dtype)
    (grad,) = torch.autograd.grad([z, kl], [leaf], [gz, gkl])
    return z.detach(), kl.detach(), grad


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", [((4, 8, 5, 6), 1), ((3, 14), -1), ((2, 6, 1023), 1), ((2, 2, 4097), -2),
                                       ((5, 2), 1)], ids=str)
@pytest.mark.parametrize("bounds", BOUNDS, ids=str)
def test_matches_chunked_call(pair, dtype, shape, dim, bounds, gen):
    device, backend = pair
    params = randn(*shape, gen=gen, device=device, dtype=dtype, scale=1.5)
    for reduction in ("per_sample", "none", "batchmean"):
        got = grads_of(lambda p: pyvae.reparameterize_kl_packed(p, dim=dim, logvar_min=bounds[0], logvar_max=bounds[1],
                                                                seed=11, reduction=reduction, backend=backend), params)
        want = grads_of(lambda p: chunked(p, dim % len(shape), bounds, backend, reduction=reduction), params)
        for g, w, name in zip(got, want, ("z", "kl", "grad")):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} ({reduction}): {m}")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64_reference(pair, dtype, gen):
    device, backend = pair
    params = randn(3, 2, 37, gen=gen, device=device, dtype=dtype, scale=3.0)
    z, kl = pyvae.reparameterize_kl_packed(params, dim=1, logvar_min=-2.0, logvar_max=1.0, seed=5, backend=backend)
    mu, logvar = params.double().cpu().unbind(1)
    logvar = logvar.clamp(-2.0, 1.0)
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, torch.tensor(5), 1, "per_sample")
    assert z.shape == (3, 1, 37)
    assert_close_scaled(z.cpu()[:, 0], z_ref[0], dtype, VALUE, noise_scale(mu, logvar, reference_eps(5, mu.shape)[0]), "z")
    assert_close_scaled(kl.cpu(), kl_ref, dtype, SUM, (0.5 * (1 + logvar.abs() + mu ** 2 + logvar.exp())).sum(-1), "kl")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_clamp_gradient_is_torch_clamps(pair):
    # torch.clamp passes the gradient at the bounds themselves and none beyond them or for NaN;
    # NaN stays NaN forward
    device, backend = pair
    logvar = torch.tensor([-31.0, -30.0, -1.0, 20.0, 21.0, float("nan"), float("inf"), float("-inf")])
    params = torch.stack([torch.full_like(logvar, 0.5), logvar]).unsqueeze(0).to(device)  # [1, 2, 8]
    got = grads_of(lambda p: pyvae.reparameterize_kl_packed(p, dim=1, logvar_min=-30.0, logvar_max=20.0, seed=2,
                                                            reduction="none", backend=backend), params)
    want = grads_of(lambda p: chunked(p, 1, (-30.0, 20.0), "torch", seed=2, reduction="none"), params)
    for g, w, name in zip(got, want, ("z", "kl", "grad")):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=1e-5, atol=1e-5, equal_nan=True, msg=lambda m: f"{name}: {m}")
    grad_logvar = got[2][0, 1].cpu()
    assert (grad_logvar[[0, 4, 5, 6, 7]] == 0).all()
    assert (grad_logvar[[1, 2, 3]] != 0).all()
    assert torch.isnan(got[0][0, 0, 5]) and torch.isnan(got[1][0, 0, 5])


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "reparam_kl"))
def test_saves_only_params_and_seed(backend, gen):
    params = randn(4, 8, 16, gen=gen).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pyvae.reparameterize_kl_packed(params, dim=1, logvar_min=-30.0, logvar_max=20.0, seed=1, backend=backend)
    storages = {t.untyped_storage().data_ptr() for t in saved if t.numel() > 1}
    assert storages == {params.untyped_storage().data_ptr()}
    assert all(t.numel() in (1, params.numel()) for t in saved)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", [b for b in pyvae.backends.available("cpu", "reparam_kl") if b != "torch"])
def test_one_op_each_way_no_clamp_or_cat_pass(backend, gen):
    # what the packed op saves over chunk + clamp: no clamp pass forward, no cat of the halves'
    # gradients backward; the expanded gradient of z.sum() is read in place (no copy)
    params = randn(4, 8, 16, gen=gen).requires_grad_()
    with _OpNames() as forward:
        z, kl = pyvae.reparameterize_kl_packed(params, dim=1, logvar_min=-30.0, logvar_max=20.0, seed=1,
                                               backend=backend)
    with _OpNames() as backward:
        (z.sum() + kl.sum()).backward()
    for names in (forward.names, backward.names):
        assert not {"clamp", "hardtanh", "cat", "stack", "copy_", "clone", "contiguous"} & set(names), names
    assert any("packed_forward" in n for n in forward.names)
    assert any("packed_backward" in n for n in backward.names)


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("packed", [False, True], ids=["mu_logvar", "packed"])
def test_expanded_grad_z_gives_the_same_gradients(pair, packed, gen):
    device, backend = pair
    params = randn(3, 2, 10, gen=gen, device=device)
    seed = torch.tensor(4, device=device)
    expanded = torch.full((), 0.75, device=device).expand(3, 10)
    row = randn(3, 1, gen=gen, device=device).expand(3, 10)  # one value per row: column stride 0
    suffix = "_triton" if backend == "triton" else ""
    for grad_z in (expanded, row):
        if packed:
            op = getattr(torch.ops.pyvae, f"reparam_kl_packed_backward{suffix}")
            got, want = op(params, seed, grad_z, None), op(params, seed, grad_z.contiguous(), None)
        else:
            op = getattr(torch.ops.pyvae, f"reparam_kl_backward{suffix}")
            mu, logvar = params.unbind(1)
            got = torch.stack(op(mu, logvar, seed, grad_z[None], None)[:2])
            want = torch.stack(op(mu, logvar, seed, grad_z[None].contiguous(), None)[:2])
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_float64_reference(reduction, gen):
    params = (0.5 * torch.randn(3, 2, 5, dtype=torch.float64, generator=gen)).requires_grad_()
    fn = lambda p: pyvae.reparameterize_kl_packed(p, dim=1, logvar_min=-0.7, logvar_max=0.7, seed=3,  # noqa: E731
                                                  reduction=reduction, backend="torch")
    assert torch.autograd.gradcheck(fn, [params])
    assert torch.autograd.gradgradcheck(fn, [params])


def _packed(backend, params, reduction="per_sample"):
    return pyvae.reparameterize_kl_packed(params, dim=1, logvar_min=-1.0, logvar_max=1.0, seed=7, reduction=reduction,
                                          backend=backend)


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "reparam_kl"))
@pytest.mark.parametrize("reduction", ["per_sample", "batchmean", "none"])
def test_second_order_gradients_match_reference(backend, reduction, gen):
    transforms.assert_second_order_matches_reference(lambda b, p: _packed(b, p, reduction), backend,
                                                     [randn(4, 2, 8, gen=gen, scale=0.8)])


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "reparam_kl"))
def test_torch_func_transforms_match_loop(backend, gen):
    transforms.assert_func_transforms_match_loop(_packed, backend, [randn(3, 4, 2, 8, gen=gen, scale=0.8)])


@pytest.mark.parametrize("pair", compile_pairs("reparam_kl"), ids=pair_id)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiles_in_bounded_time_without_recompiles(pair, dynamic):
    device, backend = pair

    def make(size):
        return [randn(4 + size, 2, 8, gen=torch.Generator().manual_seed(size)).to(device)]

    transforms.assert_compiles_once(lambda b, p: _packed(b, p, "batchmean"), backend, make, dynamic)


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
def test_opcheck(pair, gen):
    device, backend = pair
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.pyvae, f"reparam_kl_packed_forward{suffix}")
    bwd = getattr(torch.ops.pyvae, f"reparam_kl_packed_backward{suffix}")
    checks = {}
    if backend == "triton" and device == "cpu":  # the interpreter runs kernels on fake tensors
        checks = {"test_utils": ("test_schema", "test_autograd_registration")}
    params = randn(3, 2, 10, gen=gen, device=device)
    seed = torch.tensor(5, device=device)
    for per_element in (False, True):
        torch.library.opcheck(fwd, (params, 5, per_element, -1.0, 1.0), **checks)
    torch.library.opcheck(fwd, (params, 5, False), **checks)
    torch.library.opcheck(bwd, (params, seed, randn(3, 10, gen=gen, device=device),
                                randn(3, 10, gen=gen, device=device), None, 0.5), **checks)
    torch.library.opcheck(bwd, (params, seed, None, None), **checks)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_empty_batch(pair):
    device, backend = pair
    params = torch.zeros(0, 4, 3, device=device, requires_grad=True)
    z, kl = pyvae.reparameterize_kl_packed(params, dim=1, seed=1, backend=backend)
    assert z.shape == (0, 2, 3) and kl.shape == (0,)
    (z.sum() + kl.sum()).backward()
    assert params.grad.shape == params.shape


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(params=torch.zeros(2, 3)), ValueError, "even size along dim 1"),
    (dict(params=torch.zeros(2, 4), dim=2), ValueError, "out of range"),
    (dict(params=torch.zeros(2, 4), dim=1.0), TypeError, "dim must be an int"),
    (dict(params=torch.zeros(())), ValueError, "at least one dimension"),
    (dict(params=torch.zeros(2, 4), logvar_min=1.0, logvar_max=0.0), ValueError, "logvar_min must be <= logvar_max"),
    (dict(params=torch.zeros(2, 4), logvar_min=float("nan")), ValueError, "logvar_min must not be NaN"),
    (dict(params=torch.zeros(2, 4), logvar_max="1"), TypeError, "logvar_max must be None or a float"),
    (dict(params=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "params"),
    (dict(params=torch.zeros(2, 4), reduction="avg"), ValueError, "reduction"),
    (dict(params=torch.zeros(2, 4), seed=-1), ValueError, "seed"),
])
def test_bad_input(kwargs, error, message):
    params = kwargs.pop("params")
    with pytest.raises(error, match=message):
        pyvae.reparameterize_kl_packed(params, **kwargs)
