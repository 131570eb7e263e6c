"""pyvae.bernoulli_nll / gaussian_nll / continuous_bernoulli_nll on every backend against float64."""
from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F

import pyvae
from pyvae._constants import LOGVAR_GROUP_ROWS, LikelihoodFlag
from pyvae.ops.likelihood import LikelihoodFunction, LikelihoodSpec, likelihood_reference

from cases import (DTYPES, NATIVE_PAIRS, PAIRS, REDUCTIONS, compile_pairs, needs_native_cpu, no_sync_pairs,
                   pair_id, rand, randn, run_with_cpu_isa, skip_if_interpreted, skip_unless_available)
from families.likelihood import LOSSES
from probes import allocated_bytes, no_host_sync
from tolerances import SUM, VALUE, assert_close, assert_close_scaled
import transforms

def make(shape, dtype, device, loss, gen, requires_grad=False):
    """Fresh prediction (logits ~ 3 N(0,1), or means ~ N(0,1)) and targets in [0, 1] from `gen`."""
    pred = randn(*shape, gen=gen, device=device, dtype=dtype, scale=1.0 if loss == "gaussian" else 3.0)
    target = rand(*shape, gen=gen, device=device, dtype=dtype)
    return pred.requires_grad_(requires_grad), target.requires_grad_(requires_grad)


def reference(loss, pred, target, reduction, logvar=None, fixed=0.0, full=True):
    """The float64 oracle from the exact (already rounded) inputs."""
    constant = 0.5 * math.log(2 * math.pi) if (loss == "gaussian" and full) else 0.0
    values = likelihood_reference(loss, pred.double(), target.double(),
                                  None if logvar is None else logvar.double(), fixed, constant)
    values = values.expand(pred.shape)
    if reduction == "none":
        return values
    per_sample = values.reshape(pred.shape[0], math.prod(pred.shape[1:])).sum(1)
    return {"per_sample": per_sample, "sum": per_sample.sum(), "batchmean": per_sample.sum() / pred.shape[0],
            "mean": per_sample.sum() / pred.numel()}[reduction]


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1), (2, 7), (2, 1023), (2, 65537), (3, 3, 8, 8), (5,)], ids=str)
def test_forward_matches_reference(pair, loss, dtype, shape, gen):
    device, backend = pair
    skip_if_interpreted(pair, math.prod(shape))
    pred, target = make(shape, dtype, device, loss, gen)
    for reduction in REDUCTIONS:
        out = LOSSES[loss](pred, target, reduction=reduction, backend=backend)
        expected = reference(loss, pred, target, reduction)
        assert out.dtype == torch.float32 and out.shape == expected.shape
        assert_close(out, expected, dtype, VALUE if reduction == "none" else SUM,
                     scale=1 if reduction == "none" else math.prod(shape[1:]))


LOGVAR_FORMS = {  # (shape, device, gen) -> logvar
    "none": lambda shape, device, gen: None,
    "float": lambda shape, device, gen: -0.7,
    "scalar tensor": lambda shape, device, gen: torch.tensor(0.3, device=device),
    "per channel": lambda shape, device, gen: randn(1, shape[1], 1, 1, gen=gen, device=device, scale=0.5),
    "per channel, no batch dim": lambda shape, device, gen: randn(shape[1], 1, 1, gen=gen, device=device, scale=0.5),
    "per pixel": lambda shape, device, gen: randn(1, *shape[1:], gen=gen, device=device, scale=0.5),
    "per element": lambda shape, device, gen: randn(*shape, gen=gen, device=device, scale=0.5),
    "per sample": lambda shape, device, gen: randn(shape[0], 1, 1, 1, gen=gen, device=device, scale=0.5),
}


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("form", list(LOGVAR_FORMS))
@pytest.mark.parametrize("full", [True, False])
def test_gaussian_logvar_forms(pair, form, full, gen):
    device, backend = pair
    shape = (4, 3, 5, 6)
    mean, target = make(shape, torch.float32, device, "gaussian", gen, requires_grad=True)
    logvar = LOGVAR_FORMS[form](shape, device, gen)
    if isinstance(logvar, torch.Tensor):
        logvar.requires_grad_()
    for reduction in REDUCTIONS:
        out = pyvae.gaussian_nll(mean, target, logvar, full=full, reduction=reduction, backend=backend)
        grad_out = torch.randn_like(out)
        inputs = [mean, target] + ([logvar] if isinstance(logvar, torch.Tensor) else [])
        grads = torch.autograd.grad(out, inputs, grad_out)

        ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
        lv_ref = ref_inputs[2] if len(ref_inputs) == 3 else None
        fixed = logvar if isinstance(logvar, float) else 0.0
        expected = reference("gaussian", ref_inputs[0], ref_inputs[1], reduction, lv_ref, fixed, full)
        ref_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
        scale = 1 if reduction == "none" else math.prod(shape[1:])
        assert_close(out, expected, torch.float32, VALUE if reduction == "none" else SUM, scale)
        for g, rg in zip(grads, ref_grads):
            assert g.shape == rg.shape
            assert_close(g, rg, torch.float32, VALUE, scale=math.prod(shape) / rg.numel() * 10)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_logvar_expanded_to_the_batch(pair, reduction, gen):
    # A learned per-channel log-variance handed over as .expand(B, ...): batch-shaped with stride 0
    # in dim 0. Its gradient follows the shape (per element, summed by expand's backward), over
    # more than one 16-row group.
    device, backend = pair
    shape = (37, 5)
    mean, target = make(shape, torch.float32, device, "gaussian", gen, requires_grad=True)
    param = (0.5 * torch.randn(1, 5, device=device)).requires_grad_()
    out = pyvae.gaussian_nll(mean, target, param.expand(shape), reduction=reduction, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [mean, param], grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (mean, target, param)]
    expected = reference("gaussian", ref_inputs[0], ref_inputs[1], reduction, ref_inputs[2].expand(shape), 0.0, True)
    ref_grads = torch.autograd.grad(expected, [ref_inputs[0], ref_inputs[2]], grad_out.double())
    assert_close(out, expected, torch.float32, VALUE if reduction == "none" else SUM, 1 if reduction == "none" else 5)
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape
        assert_close(g, rg, torch.float32, VALUE, scale=math.prod(shape) / rg.numel() * 10)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("full", [True, False])
def test_gaussian_optimal_variance(pair, full, gen):
    device, backend = pair
    shape = (4, 2, 6, 5)
    mean, target = make(shape, torch.float32, device, "gaussian", gen, requires_grad=True)
    m64, t64 = mean.detach().double().requires_grad_(), target.detach().double().requires_grad_()
    for reduction in REDUCTIONS:
        out = pyvae.gaussian_nll(mean, target, "optimal", full=full, reduction=reduction, backend=backend)
        # the reference: sigma^2 = MSE over the batch, differentiated through
        log_var = torch.log(((t64 - m64) ** 2).mean())
        expected = reference("gaussian", m64, t64, reduction, log_var, 0.0, full)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, [mean, target], g)
        ref_grads = torch.autograd.grad(expected, [m64, t64], g.double())
        scale = 1 if reduction == "none" else math.prod(shape[1:])
        assert_close(out, expected, torch.float32, VALUE if reduction == "none" else SUM, scale)
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, torch.float32, VALUE, scale=50)


def test_optimal_variance_is_the_maximum_likelihood():
    mean, target = torch.randn(6, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    best = pyvae.gaussian_nll(mean, target, "optimal", reduction="sum", backend="torch")
    for factor in (0.9, 1.1):
        lv = math.log(factor * ((target - mean) ** 2).mean().item())
        assert pyvae.gaussian_nll(mean, target, lv, reduction="sum", backend="torch") > best


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_matches_reference(pair, loss, dtype, reduction, gen):
    device, backend = pair
    pred, target = make((3, 2, 5, 7), dtype, device, loss, gen, requires_grad=True)
    out = LOSSES[loss](pred, target, reduction=reduction, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [pred, target], g)
    p64, t64 = pred.detach().double().requires_grad_(), target.detach().double().requires_grad_()
    ref_grads = torch.autograd.grad(reference(loss, p64, t64, reduction), [p64, t64], g.double())
    for a, b in zip(grads, ref_grads):
        assert a.dtype == dtype
        assert_close(a, b, dtype, VALUE, scale=4)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_mixed_dtypes_and_noncontiguous(pair):
    device, backend = pair
    logits = (3 * torch.randn(6, 20, device=device)).bfloat16()[:, ::2].requires_grad_()  # strided rows
    target = torch.rand(10, 6, device=device).t()  # float32, transposed
    out = pyvae.bernoulli_nll(logits, target, reduction="per_sample", backend=backend)
    out.sum().backward()
    assert_close(out, reference("bernoulli", logits, target, "per_sample"), torch.bfloat16, SUM, scale=10)
    assert logits.grad.dtype == torch.bfloat16
    assert_close(logits.grad, torch.sigmoid(logits.detach().double()) - target.double(), torch.bfloat16, VALUE)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_gradcheck_float64(loss):
    pred = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    logvar = (0.3 * torch.randn(1, 4, 1, dtype=torch.float64)).requires_grad_() if loss == "gaussian" else None
    inputs = (pred, target) + ((logvar,) if logvar is not None else ())

    def fn(p, t, lv=None):
        return LikelihoodFunction.apply(LikelihoodSpec(loss, "per_sample", "torch", constant=0.1), p, t, lv)[0]

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradcheck(
        lambda m, t: pyvae.gaussian_nll(m, t, "optimal", reduction="per_sample", backend="torch"), (pred, target))


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_element"])
def test_logvar_gradient_of_bernoulli_losses_is_zero(pair, shared, gen):
    """The ops take a logvar for every loss; the Bernoulli losses do not depend on it, and its
    gradient is exactly 0 (written, not left as whatever the buffer held)."""
    device, backend = pair
    for loss in ("bernoulli", "continuous_bernoulli"):
        pred, target = make((40, 3, 50), torch.float32, device, loss, gen)
        # a Gaussian call first leaves nonzero values in the CPU buffer cache
        pyvae.gaussian_nll(pred.clone().requires_grad_(), target, reduction="sum", backend=backend).backward()
        logvar = torch.randn((1, 3, 1) if shared else (40, 3, 50), device=device, requires_grad=True)
        LikelihoodFunction.apply(LikelihoodSpec(loss, "sum", backend), pred, target, logvar)[0].backward()
        assert torch.equal(logvar.grad, torch.zeros_like(logvar))


# ----------------------------------------------------------------------------- agreement with torch
def test_agrees_with_torch_functional_and_distributions():
    torch.manual_seed(0)
    logits = 4 * torch.randn(8, 3, 16, 16, dtype=torch.float64)
    target = torch.rand(8, 3, 16, 16, dtype=torch.float64)
    for backend in pyvae.backends.available("cpu"):
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 8
        cb = -torch.distributions.ContinuousBernoulli(logits=logits).log_prob(target).sum() / 8
        var = torch.rand(1, 3, 1, 1, dtype=torch.float64) + 0.5
        gauss = F.gaussian_nll_loss(logits, target, var.expand_as(logits), full=True, reduction="sum") / 8
        dt = torch.float64 if backend == "torch" else torch.float32
        tol = dict(rtol=1e-6 if backend != "torch" else 1e-10, atol=0)
        torch.testing.assert_close(pyvae.bernoulli_nll(logits.to(dt), target.to(dt), backend=backend).double(), bce, **tol)
        torch.testing.assert_close(pyvae.continuous_bernoulli_nll(logits.to(dt), target.to(dt), backend=backend).double(),
                                   cb, **tol)
        torch.testing.assert_close(pyvae.gaussian_nll(logits.to(dt), target.to(dt), var.log().to(dt),
                                                      backend=backend).double(), gauss, **tol)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_stable_at_extreme_logits(pair):
    device, backend = pair
    logits = torch.tensor([[-1e4, -100.0, -20.0, -0.3, -1e-6, 0.0, 1e-6, 0.3, 20.0, 100.0, 1e4]], device=device)
    target = torch.tensor([[0.0, 0.2, 1.0, 0.5, 0.5, 0.5, 0.5, 0.7, 0.0, 1.0, 0.3]], device=device)
    for loss in ("bernoulli", "continuous_bernoulli"):
        logits_g = logits.clone().requires_grad_()
        out = LOSSES[loss](logits_g, target, reduction="none", backend=backend)
        out.sum().backward()
        assert out.isfinite().all() and logits_g.grad.isfinite().all()
        expected = reference(loss, logits, target, "none")
        torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=2e-6)
    # Far below 0, softplus(l) = log1p(e^l) is e^l to within a rounding: relative accuracy, where an
    # absolute tolerance would not see a wrong factor (an earlier CPU/CUDA version returned 2 e^l).
    deep = torch.tensor([[-17.0, -25.0, -40.0, -80.0]], device=device)
    out = pyvae.bernoulli_nll(deep, torch.zeros_like(deep), reduction="none", backend=backend)
    torch.testing.assert_close(out.double(), deep.double().exp(), rtol=1e-5, atol=0.0)
    # lambda = 0.5: log C = log 2 exactly, so the NLL of any target is 0 and its slope 0.5 - t
    zero = torch.zeros(1, 3, device=device)
    assert pyvae.continuous_bernoulli_nll(zero, torch.rand(1, 3, device=device), reduction="none",
                                          backend=backend).abs().max() < 1e-6


# ----------------------------------------------------------------------------- NaN / Inf rules
# The README's rules for non-finite inputs, one function per loss: the value and the derivatives of
# one element from Python floats (an independent spelling of each rule: the tests hold every backend,
# the reference included, to it). Every combination of these values is tested, for each input.
INF, NAN = math.inf, math.nan
LARGE = 1e4  # saturates every logit (e^-LARGE = 0) and over/underflows e^-logvar in float32 and float64
SPECIAL = (0.0, 1.0, -1.0, LARGE, -LARGE, INF, -INF, NAN)
TARGETS = (0.0, 0.5, 1.0, -1.0, LARGE, -LARGE, INF, -INF, NAN)  # a soft target too
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # NaN -> NaN
    return e / (1.0 + e)


def _softplus(x: float) -> float:
    return x if math.isnan(x) else max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _limit_coefficient(l: float, t: float) -> float:
    """The loss at an infinite logit l is c * l + (a term that is 0, or -inf for the continuous
    Bernoulli): c = 1 - t at +inf, -t at -inf."""
    return 1.0 - t if l > 0 else -t


def bernoulli_rule(l: float, t: float) -> tuple[float, float, float]:
    """(value, d/dl, d/dt). Finite l: softplus(l) - t l in IEEE arithmetic (so an infinite target
    gives ±inf, or NaN at l = 0). l = ±inf: the limit l -> ±inf at that t, c l with c = 1 - t or -t:
    0 where c = 0 (the target the logit predicts with certainty), ±inf elsewhere, NaN for NaN t.
    Derivatives everywhere sigmoid(l) - t and -l."""
    if math.isinf(l):
        c = _limit_coefficient(l, t)
        value = 0.0 if c == 0 else c * l
    else:
        value = _softplus(l) - t * l
    return value, _sigmoid(l) - t, -l


def continuous_bernoulli_rule(l: float, t: float) -> tuple[float, float, float]:
    """(value, d/dl, d/dt). Finite l: softplus(l) - t l - log(l / tanh(l / 2)) (log 2 at l = 0).
    l = ±inf: the limit l -> ±inf at that t, of c l - log|l| + o(1): +inf where c l = +inf, -inf
    where c l is 0 or -inf (a density unbounded at the target), NaN for NaN t.
    d/dl = sigmoid(l) - t - (1/l - 1/sinh l) (0.5 - t at 0, c at ±inf), d/dt = -l."""
    if math.isinf(l):
        c = _limit_coefficient(l, t)
        limit = 0.0 if c == 0 else c * l
        value = limit if math.isnan(limit) else (INF if limit == INF else -INF)
        return value, c, -l
    log_norm = math.log(2.0) if l == 0 else math.log(l / math.tanh(l / 2))
    inv_sinh = 0.0 if abs(l) > 700 else (1.0 / math.sinh(l) if l != 0 else 0.0)
    d_log_norm = 0.0 if l == 0 else 1.0 / l - inv_sinh
    return _softplus(l) - t * l - log_norm, _sigmoid(l) - t - d_log_norm, -l


def gaussian_rule(m: float, t: float, v: float) -> tuple[float, float, float, float]:
    """(value, d/dm, d/dt, d/dv) of 0.5 ((t - m)^2 e^-v + v) + log(2 pi) / 2 in IEEE arithmetic, but
    where e^-v overflows (v = -inf, or v < -88.7 in float32) the variance is 0: the loss is +inf where
    t != m (the formula's inf - inf would be NaN at v = -inf) and NaN where t = m (0 inf)."""
    diff = m - t
    inv_var = _exp(-v)
    scaled = diff * inv_var
    q = diff * scaled
    value = 0.5 * q + HALF_LOG_2PI if v == -INF else 0.5 * (q + v) + HALF_LOG_2PI
    return value, scaled, -scaled, 0.5 * (1.0 - q)


RULES = {"bernoulli": bernoulli_rule, "continuous_bernoulli": continuous_bernoulli_rule, "gaussian": gaussian_rule}


def special_grid(loss: str, dtype: torch.dtype, device="cpu") -> list[torch.Tensor]:
    """Every combination of the special values: prediction x target (x logvar), as [rows, cols]
    tensors in ``dtype`` (a row per prediction value)."""
    axes = (SPECIAL, TARGETS) if loss != "gaussian" else (SPECIAL, SPECIAL, SPECIAL)
    mesh = torch.meshgrid(*[torch.tensor(a, dtype=torch.float64) for a in axes], indexing="ij")
    return [m.reshape(len(axes[0]), -1).to(dtype=dtype, device=device).contiguous() for m in mesh]


def rule_table(loss: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """[value, derivative per input] of the rule, float64, from the inputs as they are (rounded)."""
    columns = zip(*(x.double().cpu().flatten().tolist() for x in inputs))
    rows = [RULES[loss](*args) for args in columns]
    return [torch.tensor(col, dtype=torch.float64).reshape(inputs[0].shape) for col in zip(*rows)]


def backend_table(loss: str, backend: str, inputs: list[torch.Tensor], reduction="sum") -> list[torch.Tensor]:
    """[per-element value, gradient of the ``reduction`` of the loss per input] on ``backend``."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    kwargs = {"logvar": xs[2]} if loss == "gaussian" else {}
    value = LOSSES[loss](xs[0], xs[1], reduction="none", backend=backend, **kwargs)
    out = LOSSES[loss](xs[0], xs[1], reduction=reduction, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, xs, torch.ones_like(out))
    return [value.detach(), *grads]


NAMES = {"bernoulli": ("logits", "target"), "continuous_bernoulli": ("logits", "target"),
         "gaussian": ("mean", "target", "logvar")}


def assert_table(got: list[torch.Tensor], expected: list[torch.Tensor], loss: str, dtype: torch.dtype,
                 what: str, reduction="sum") -> None:
    """NaN exactly where expected, ±inf exactly where expected, finite values within the dtype's
    tolerance (values are float32, or float64 on backend='torch' with float64 inputs)."""
    value_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = 1.0 if reduction == "sum" else 1.0 / got[0].shape[0]  # batchmean's factor on the gradients
    assert_close_scaled(got[0], expected[0], value_dtype, VALUE, what=f"{loss} value {what}")
    for g, e, name in zip(got[1:], expected[1:], NAMES[loss]):
        # logvar's gradient goes through a float32 buffer on every backend
        tol_dtype = torch.float32 if name == "logvar" and dtype == torch.float64 else dtype
        assert_close_scaled(g, e * scale, tol_dtype, VALUE, what=f"{loss} d/d{name} {what}")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nan_inf_rules(pair, loss, dtype):
    """Values and gradients of every combination of 0, ±1, ±large, ±inf, NaN in each input follow
    the README's rules, identically on every backend (exact NaN and ±inf positions)."""
    device, backend = pair
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 is the torch backend's")
    inputs = special_grid(loss, dtype, device)
    expected = rule_table(loss, inputs)
    for reduction in ("sum", "batchmean"):  # the kernels' unit gradient, and one the reduction scales
        assert_table(backend_table(loss, backend, inputs, reduction), expected, loss, dtype, f"({reduction})",
                     reduction)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("logvar", [INF, -INF, NAN, LARGE, -LARGE, 0.0])
def test_nan_inf_rules_fixed_logvar(pair, logvar):
    """A float logvar (the kernels' scalar path) follows the same rules as a tensor one."""
    device, backend = pair
    mean, target, _ = special_grid("gaussian", torch.float32, device)
    v = torch.full_like(mean, logvar)
    expected = rule_table("gaussian", [mean, target, v])
    m, t = mean.clone().requires_grad_(), target.clone().requires_grad_()
    value = pyvae.gaussian_nll(m, t, logvar, reduction="none", backend=backend)
    grads = torch.autograd.grad(pyvae.gaussian_nll(m, t, logvar, reduction="sum", backend=backend), [m, t])
    assert_table([value, *grads], expected[:3], "gaussian", torch.float32, f"(logvar={logvar})")


def _float64_table(loss: str, backend: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The special grid in float64 and the backend's table (computed in float32 but on the torch backend)."""
    inputs = special_grid(loss, torch.float64)
    dtype = torch.float64 if backend == "torch" else torch.float32
    return inputs, [x.double() for x in backend_table(loss, backend, [x.to(dtype) for x in inputs])]


def _torch_table(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    xs = [x.clone().requires_grad_() for x in inputs]
    value = fn(*xs)
    return [value.detach(), *torch.autograd.grad(value.sum(), xs)]


def _compare(got: torch.Tensor, expected: torch.Tensor, backend: str, what: str, float64_tol=VALUE[torch.float64]):
    """``got`` (float64 on the torch backend, float32 on the others) against PyTorch's float64 result."""
    table = {**VALUE, torch.float64: float64_tol}
    assert_close_scaled(got, expected, torch.float64 if backend == "torch" else torch.float32, table, what=what)


# Where PyTorch's Bernoulli and continuous Bernoulli NLLs are NaN for NaN-free inputs while a limit exists:
# l = -inf with t <= 1, and l = +inf with t = 1 (its formula's inf - inf and 0 * inf). pyvae gives the limit.
def _torch_nan_at_limits(l: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((l == -INF) & (t <= 1)) | ((l == INF) & (t == 1))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_bernoulli_nll_vs_binary_cross_entropy_with_logits(pair):
    """The README: equal to F.binary_cross_entropy_with_logits (values and gradients) for all inputs,
    except that where PyTorch's value is NaN at an infinite logit (l = -inf with t <= 1, l = +inf
    with t = 1) pyvae gives the limit."""
    backend = pair[1]
    inputs, got = _float64_table("bernoulli", backend)
    ours, bce = got, _torch_table(lambda l, t: F.binary_cross_entropy_with_logits(l, t, reduction="none"), inputs)
    keep = ~bce[0].isnan()
    _compare(ours[0][keep], bce[0][keep], backend, "value where PyTorch's is not NaN")
    assert torch.equal(bce[0].isnan() & ~ours[0].isnan(), _torch_nan_at_limits(*inputs))
    for g, e, name in zip(ours[1:], bce[1:], ("logits", "target")):
        _compare(g, e, backend, f"d/d{name}")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_continuous_bernoulli_nll_vs_torch_distributions(pair):
    """The README: equal to -ContinuousBernoulli(logits=l).log_prob(t) (values and gradients) for
    |l| <= 20 and for l = ±inf, except that where PyTorch's value is NaN at l = ±inf (as for the
    Bernoulli loss) pyvae gives the limit. In between PyTorch's normaliser, formed from sigmoid(l),
    loses accuracy (at |l| = LARGE the value is off by 5.6)."""
    backend = pair[1]
    inputs, ours = _float64_table("continuous_bernoulli", backend)
    theirs = _torch_table(lambda l, t: -torch.distributions.ContinuousBernoulli(logits=l, validate_args=False)
                          .log_prob(t), inputs)
    l = inputs[0]
    compared = (l.abs() <= 20) | l.isinf() | l.isnan()
    keep = compared & ~theirs[0].isnan()
    _compare(ours[0][keep], theirs[0][keep], backend, "value where PyTorch's is not NaN", (1e-8, 1e-8))
    assert torch.equal(theirs[0].isnan() & ~ours[0].isnan(), _torch_nan_at_limits(*inputs))
    for g, e, name in zip(ours[1:], theirs[1:], ("logits", "target")):
        _compare(g[compared], e[compared], backend, f"d/d{name}", (1e-8, 1e-8))
    # PyTorch's is off at |l| = LARGE, pyvae's is not (the rule's value there is checked above)
    far = l.abs() == LARGE
    assert (theirs[0][far] - ours[0][far]).abs().nan_to_num().max() > 1


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_gaussian_nll_vs_eager_formula_and_gaussian_nll_loss(pair):
    """The README: equal to the eager formula 0.5 ((t - m)^2 exp(-v) + v) + log(2 pi)/2 under autograd
    (values and gradients) for all inputs, except at v = -inf with t != m, where the formula's
    inf - inf is NaN and pyvae gives +inf; equal to F.gaussian_nll_loss(m, t, exp(v), full=True) for
    finite inputs where exp(v) is at least its eps (1e-6) and finite."""
    backend = pair[1]
    inputs, ours = _float64_table("gaussian", backend)
    eager = _torch_table(lambda m, t, v: 0.5 * ((t - m) ** 2 * torch.exp(-v) + v) + HALF_LOG_2PI, inputs)
    m, t, v = inputs
    keep = ~eager[0].isnan()
    _compare(ours[0][keep], eager[0][keep], backend, "value where the eager formula's is not NaN")
    zero_variance = (v == -INF) & (m != t) & ~(m - t).isnan()
    assert torch.equal(eager[0].isnan() & ~ours[0].isnan(), zero_variance)
    for g, e, name in zip(ours[1:], eager[1:], NAMES["gaussian"]):
        _compare(g, e, backend, f"d/d{name}", VALUE[torch.float32] if name == "logvar" else VALUE[torch.float64])
    theirs = _torch_table(lambda m, t, v: F.gaussian_nll_loss(m, t, v.exp(), full=True, reduction="none"), inputs)
    usable = m.isfinite() & t.isfinite() & (v >= math.log(1e-6)) & (v.exp() < INF)
    assert usable.sum() > 20
    for g, e, name in zip(ours, theirs, ("value",) + NAMES["gaussian"]):
        _compare(g[usable], e[usable], backend, f"F.gaussian_nll_loss {name}",
                 VALUE[torch.float32] if name == "logvar" else VALUE[torch.float64])


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_deterministic_and_thread_independent(pair, gen):
    device, backend = pair
    skip_if_interpreted(pair, 3 * 70000)
    pred, target = make((3, 70000), torch.float32, device, "bernoulli", gen)
    first = pyvae.bernoulli_nll(pred, target, reduction="per_sample", backend=backend)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = pyvae.bernoulli_nll(pred, target, reduction="per_sample", backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    assert torch.equal(first, pyvae.bernoulli_nll(pred, target, reduction="per_sample", backend=backend))


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_empty_batch(pair):
    device, backend = pair
    pred = torch.randn(0, 3, 4, device=device)
    assert pyvae.bernoulli_nll(pred, pred, reduction="per_sample", backend=backend).shape == (0,)
    assert pyvae.bernoulli_nll(pred, pred, reduction="sum", backend=backend).item() == 0
    assert pyvae.bernoulli_nll(pred, pred, reduction="none", backend=backend).shape == (0, 3, 4)
    # a shared log-variance on an empty batch: a zero loss and a zero gradient
    mean = pred.clone().requires_grad_()
    for logvar in (torch.zeros(3, 4, device=device), torch.zeros(1, 3, 1, device=device)):
        logvar.requires_grad_()
        loss = pyvae.gaussian_nll(mean, pred, logvar, reduction="sum", backend=backend)
        loss.backward()
        assert loss.item() == 0 and torch.equal(logvar.grad, torch.zeros_like(logvar))


# ----------------------------------------------------------------------------- bad input
BAD = [
    (lambda: pyvae.bernoulli_nll(torch.randn(2, 3), torch.rand(2, 4)), ValueError, "same shape"),
    (lambda: pyvae.bernoulli_nll(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int64)), TypeError,
     "target must be a floating"),
    (lambda: pyvae.continuous_bernoulli_nll(torch.ones(2, 3, dtype=torch.int32), torch.rand(2, 3)), TypeError,
     "logits must be a floating"),
    (lambda: pyvae.bernoulli_nll(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "0-d"),
    (lambda: pyvae.bernoulli_nll(torch.randn(2, 3), torch.rand(2, 3), reduction="elementwise"), ValueError,
     "reduction must be one of"),
    (lambda: pyvae.gaussian_nll(torch.randn(2, 3, 4), torch.rand(2, 3, 4), torch.randn(5, 1)), ValueError,
     "does not broadcast"),
    (lambda: pyvae.gaussian_nll(torch.randn(2, 3), torch.rand(2, 3), torch.randn(1, 2, 3)), ValueError,
     "does not broadcast"),
    (lambda: pyvae.gaussian_nll(torch.randn(2, 3), torch.rand(2, 3), "learned"), ValueError, "'optimal'"),
    (lambda: pyvae.gaussian_nll(torch.randn(2, 3), torch.rand(2, 3), True), TypeError, "logvar must be"),
    (lambda: pyvae.gaussian_nll([1.0], torch.rand(1)), TypeError, "mean must be a torch.Tensor"),
    (lambda: pyvae.bernoulli_nll(torch.randn(2, 3), torch.rand(2, 3), backend="cuda"), ValueError, "cannot serve"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_targets_outside_unit_interval_are_not_clamped():
    logits, target = torch.tensor([[0.5, -2.0]]), torch.tensor([[1.5, -0.5]])
    out = pyvae.bernoulli_nll(logits, target, reduction="none")
    torch.testing.assert_close(out, F.softplus(logits) - target * logits)


def test_different_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    with pytest.raises(ValueError, match="device"):
        pyvae.bernoulli_nll(torch.randn(2, 3), torch.rand(2, 3, device="cuda"))


# ----------------------------------------------------------------------------- registration, compile
@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
def test_opcheck(pair, gen):
    device, backend = pair
    op = torch.ops.pyvae.likelihood_forward_triton if backend == "triton" else torch.ops.pyvae.likelihood_forward
    checks = {"test_utils": ("test_schema", "test_autograd_registration")} if (backend, device) == ("triton", "cpu") else {}
    pred, target = make((3, 2, 4), torch.float32, device, "gaussian", gen)
    logvar = torch.randn(1, 2, 1, device=device)
    flag = LikelihoodFlag
    for loss in ("bernoulli", "gaussian", "continuous_bernoulli"):
        logvar_grad = flag.GRAD_LOGVAR | flag.GROUP_LOGVAR_GRAD if loss == "gaussian" else 0
        for per_element in (0, flag.PER_ELEMENT):
            for flags in (per_element, per_element | flag.GRAD_PRED | flag.GRAD_TARGET | logvar_grad):
                torch.library.opcheck(op, (loss, pred, target, logvar if loss == "gaussian" else None, 0.2, 0.1,
                                           flags, 0.25), **checks)


@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad(pair, dtype):
    device, backend = pair
    op = torch.ops.pyvae.scale_grad_triton_ if backend == "triton" else torch.ops.pyvae.scale_grad_
    grad = torch.randn(5, 4099, device=device).to(dtype)
    for value in (1.0, 0.5, -3.0, float("inf"), float("nan"), 0.0):
        scale = torch.tensor(value, device=device)
        scaled = grad.clone()
        op(scaled, scale)
        expected = (grad.float() * value).to(dtype)
        # one rounding of the float32 product (the Triton interpreter truncates to 16 bits: 1 ulp)
        rtol = torch.finfo(dtype).eps if (device, backend) == ("cpu", "triton") and dtype != torch.float32 else 0.0
        torch.testing.assert_close(scaled, expected, rtol=rtol, atol=0.0, equal_nan=True)
    checks = {"test_utils": ("test_schema", "test_autograd_registration")} if (backend, device) == ("triton", "cpu") else {}
    torch.library.opcheck(op, (grad.clone(), torch.tensor(0.5, device=device)), **checks)
    # It writes into its argument: a bad scale (whose first value a late check would already have
    # applied) is refused before any element is scaled.
    kept = grad.clone()
    for bad in (torch.tensor([2.0, 3.0], device=device), torch.tensor(2.0, dtype=torch.float64, device=device)):
        with pytest.raises((ValueError, RuntimeError), match="scale must be a single float32 value"):
            op(kept, bad)
        assert torch.equal(kept, grad)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_scales(pair, reduction, gen):
    # The kernels fold the reduction's factor into the gradient and backward skips the scaling for a
    # unit upstream gradient: check both the skipped and the scaled paths against the reference.
    device, backend = pair
    logits, target = make((3, 50), torch.float32, device, "bernoulli", gen, requires_grad=True)
    ref = likelihood_reference("bernoulli", logits.double(), target.double())
    ref = {"sum": ref.sum(), "batchmean": ref.sum() / 3, "mean": ref.mean(), "per_sample": ref.sum(1),
           "none": ref}[reduction]
    for upstream in (1.0, 2.5):
        out = pyvae.bernoulli_nll(logits, target, reduction=reduction, backend=backend)
        upstream_t = torch.full_like(out, upstream)
        got = torch.autograd.grad(out, logits, upstream_t)[0]
        expected = torch.autograd.grad(ref, logits, upstream_t.double(), retain_graph=True)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_retain_graph_second_backward_is_identical(gen):
    pred, target = make((3, 40), torch.float32, "cpu", "bernoulli", gen, requires_grad=True)
    logvar = torch.zeros(1, 40, requires_grad=True)
    for backend in pyvae.backends.available("cpu"):
        out = pyvae.gaussian_nll(pred, target, logvar, backend=backend)
        first = torch.autograd.grad(out, [pred, target, logvar], retain_graph=True)
        second = torch.autograd.grad(out, [pred, target, logvar])
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_second_backward_without_retain_graph_raises(gen):
    pred, target = make((3, 40), torch.float32, "cpu", "bernoulli", gen, requires_grad=True)
    for backend in pyvae.backends.available("cpu"):
        out = pyvae.bernoulli_nll(pred, target, backend=backend)
        torch.autograd.grad(out, pred)
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            torch.autograd.grad(out, pred)


def test_keeps_only_references_to_its_inputs_for_backward(gen):
    """The gradient is computed in forward; backward keeps the prediction and the target alive (as
    references, no copies) for a backward with create_graph=True, and nothing else: no per-element
    loss, no second gradient buffer."""
    x, y = make((3, 40), torch.float32, "cpu", "gaussian", gen, requires_grad=True)
    logvar = torch.zeros(1, 40, requires_grad=True)
    for backend in pyvae.backends.available("cpu", "likelihood"):
        pred, target = x * 2.0, y * 1.0  # held by this frame only (x * 2.0's backward needs no x)
        m, t = pred.detach().clone(), target.detach().clone()
        out = pyvae.gaussian_nll(pred, target, logvar, backend=backend)
        alive = [weakref.ref(pred), weakref.ref(target)]
        del pred, target
        assert [ref() is not None for ref in alive] == [True, True], backend
        grad_x, grad_y = torch.autograd.grad(out, [x, y])  # batchmean of 0.5 (t - m)^2 + constant
        torch.testing.assert_close(grad_x, 2 * (m - t) / 3)
        torch.testing.assert_close(grad_y, (t - m) / 3)
        del out
        assert [ref() is None for ref in alive] == [True, True], backend  # freed with the graph


def test_no_grad_computes_no_gradients(gen):
    """Under torch.no_grad the fused forward writes no derivative buffers, although its inputs
    require grad: it allocates less than the same call with gradients by at least the prediction's
    and the target's gradient buffers (a forward that asked for them anyway would not)."""
    pred, target = make((64, 1024), torch.float32, "cpu", "gaussian", gen, requires_grad=True)
    logvar = torch.zeros(1, 1024, requires_grad=True)
    gradient_bytes = 4 * (pred.numel() + target.numel())
    for backend in pyvae.backends.available("cpu", "likelihood"):
        def call():
            return pyvae.gaussian_nll(pred, target, logvar, reduction="sum", backend=backend)

        with torch.no_grad():
            without = allocated_bytes(call)
            assert call().grad_fn is None
        assert without + gradient_bytes <= allocated_bytes(call), backend


@needs_native_cpu()
def test_torch_compile_fullgraph_cpu(gen):
    def elbo_terms(logits, mean, target, logvar):
        return (pyvae.bernoulli_nll(logits, target, backend="cpu")
                + pyvae.continuous_bernoulli_nll(logits, target, backend="cpu")
                + pyvae.gaussian_nll(mean, target, logvar, backend="cpu")
                + pyvae.gaussian_nll(mean, target, "optimal", backend="cpu"))

    logits, target = make((4, 3, 6), torch.float32, "cpu", "bernoulli", gen, requires_grad=True)
    mean = torch.randn(4, 3, 6, requires_grad=True)
    logvar = torch.zeros(1, 3, 1, requires_grad=True)
    compiled = torch.compile(elbo_terms, fullgraph=True)
    eager = elbo_terms(logits, mean, target, logvar)
    eager_grads = torch.autograd.grad(eager, [logits, mean, target, logvar])
    out = compiled(logits, mean, target, logvar)
    grads = torch.autograd.grad(out, [logits, mean, target, logvar])
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pair", no_sync_pairs("likelihood"), ids=pair_id)
def test_no_host_sync(pair, gen):
    """Every loss and reduction, forward and backward, without a host synchronisation; then what
    they computed, against the float64 reference."""
    skip_unless_available(pair, "likelihood")
    device, backend = pair
    shape = (8, 3, 16, 16)
    pred, target = make(shape, torch.float32, device, "gaussian", gen, requires_grad=True)
    logvar = randn(1, 3, 1, 1, gen=gen, device=device, scale=0.5).requires_grad_()
    pyvae.gaussian_nll(pred, target, logvar, backend=backend)  # compile outside the check
    measured = []
    with no_host_sync(device):
        for loss, lv in (("bernoulli", None), ("continuous_bernoulli", None), ("gaussian", logvar),
                         ("gaussian", "optimal")):
            inputs = [pred, target] + ([lv] if isinstance(lv, torch.Tensor) else [])
            for reduction in REDUCTIONS:
                out = LOSSES[loss](pred, target, *([] if lv is None else [lv]), reduction=reduction, backend=backend)
                measured.append((loss, lv, reduction, out, torch.autograd.grad(out, inputs, torch.ones_like(out))))
    for loss, lv, reduction, out, grads in measured:
        ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (pred, target, logvar)[:len(grads)]]
        ref_logvar = torch.log(((ref_inputs[1] - ref_inputs[0]) ** 2).mean()) if isinstance(lv, str) else (
            ref_inputs[2] if len(ref_inputs) == 3 else None)
        expected = reference(loss, ref_inputs[0], ref_inputs[1], reduction, ref_logvar)
        ref_grads = torch.autograd.grad(expected, ref_inputs, torch.ones_like(expected))
        assert_close(out.cpu(), expected, torch.float32, VALUE if reduction == "none" else SUM,
                     1 if reduction == "none" else math.prod(shape[1:]))
        for g, rg in zip(grads, ref_grads):
            assert g.shape == rg.shape, (loss, reduction)
            assert_close(g.cpu(), rg, torch.float32, VALUE, scale=math.prod(shape) / rg.numel() * 10)


def test_likelihood_layers():
    torch.manual_seed(0)
    mean, target = torch.randn(4, 3, 5, 5, requires_grad=True), torch.rand(4, 3, 5, 5)
    learned = pyvae.nn.GaussianLikelihood("learned", (3, 1, 1), init_logvar=-1.0)
    assert set(learned.state_dict()) == {"logvar"}
    out = learned(mean, target)
    torch.testing.assert_close(out, pyvae.gaussian_nll(mean, target, torch.full((3, 1, 1), -1.0)))
    out.backward()
    assert learned.logvar.grad.shape == (3, 1, 1) and learned.logvar.grad.abs().sum() > 0
    optimal = pyvae.nn.GaussianLikelihood("optimal")
    torch.testing.assert_close(optimal(mean, target), pyvae.gaussian_nll(mean, target, "optimal"))
    assert list(optimal.parameters()) == []
    logits = torch.randn(4, 10)
    torch.testing.assert_close(pyvae.nn.BernoulliLikelihood()(logits, target.flatten(1)[:, :10]),
                               pyvae.bernoulli_nll(logits, target.flatten(1)[:, :10]))
    torch.testing.assert_close(pyvae.nn.ContinuousBernoulliLikelihood(reduction="sum")(logits, target.flatten(1)[:, :10]),
                               pyvae.continuous_bernoulli_nll(logits, target.flatten(1)[:, :10], reduction="sum"))
    with pytest.raises(ValueError, match="logvar must be"):
        pyvae.nn.GaussianLikelihood("per-pixel")


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_autocast(pair):
    # A decoder under autocast hands bf16 logits / means to the loss next to float32 targets.
    device, backend = pair
    decoder = torch.nn.Linear(16, 24).to(device)
    z = torch.randn(5, 16, device=device)
    target = torch.rand(5, 24, device=device)
    for name, fn in LOSSES.items():
        decoder.zero_grad()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            pred = decoder(z)
            out = fn(pred, target, backend=backend)
        assert pred.dtype == torch.bfloat16 and out.dtype == torch.float32
        expected = reference(name, pred.detach(), target, "batchmean")
        assert_close(out, expected, torch.bfloat16, SUM)
        out.backward()
        assert decoder.weight.grad is not None and decoder.weight.grad.isfinite().all()


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape", [(37, 2, 9), (18, 16390)], ids=["3-row-groups", "2-column-blocks"])
def test_shared_logvar_gradient_summed_in_row_groups(pair, shape, gen):
    # A logvar shared by the batch gets its gradient as sums over groups of 16 rows (ragged last
    # group, several column blocks): against float64 autograd, for a scalar and a per-row upstream.
    device, backend = pair
    skip_if_interpreted(pair, math.prod(shape) // 8)
    mean, target = make(shape, torch.float32, device, "gaussian", gen, requires_grad=True)
    logvar = (0.3 * torch.randn(1, *shape[1:], device=device)).requires_grad_()
    for reduction in ("batchmean", "per_sample"):
        out = pyvae.gaussian_nll(mean, target, logvar, reduction=reduction, backend=backend)
        grad_out = torch.rand_like(out) + 0.5
        grads = torch.autograd.grad(out, [mean, logvar], grad_out)
        ref_inputs = [mean.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()]
        expected = reference("gaussian", ref_inputs[0], target.detach(), reduction, ref_inputs[1])
        ref_grads = torch.autograd.grad(expected, ref_inputs, grad_out.double())
        for g, rg in zip(grads, ref_grads):
            assert g.shape == rg.shape
            assert_close(g, rg, torch.float32, VALUE, scale=math.prod(shape) / rg.numel())
    if backend != "torch":
        op = torch.ops.pyvae.likelihood_forward_triton if backend == "triton" else torch.ops.pyvae.likelihood_forward
        for group in (False, True):
            flags = LikelihoodFlag.GRAD_LOGVAR | (LikelihoodFlag.GROUP_LOGVAR_GRAD if group else 0)
            (grad_logvar,) = op("gaussian", mean.detach(), target, logvar.detach(), 0.0, 0.0, flags, 1.0)[1]
            assert grad_logvar.shape == ((-(-shape[0] // LOGVAR_GROUP_ROWS) if group else shape[0]), *shape[1:])


def test_cpu_float16_conversion_paths_agree(tmp_path):
    """float16 chunks are converted with F16C where the CPU has it and in portable code otherwise
    (PYVAE_CPU_ISA=portable forces that): both round to nearest even, so losses and gradients are
    bit-identical, including infinities, float16 subnormals and values that overflow float16."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no F16C path on this CPU: both runs would take the portable one")
    script = (
        "import sys, torch, pyvae\n"
        "torch.manual_seed(0)\n"
        "pred = (3 * torch.randn(5, 1037)).half()\n"
        "pred[0, :6] = torch.tensor([float('inf'), -float('inf'), 6e-8, -6e-8, 65504.0, 1e-5]).half()\n"
        "target = torch.rand(5, 1037).half()\n"
        "pred.requires_grad_(); target.requires_grad_()\n"
        "out = pyvae.gaussian_nll(pred, target, reduction='none', backend='cpu')\n"
        "out.backward(torch.full_like(out, 3e4))  # gradients beyond float16's range round to inf\n"
        "b = pyvae.bernoulli_nll(pred.detach(), target.detach(), reduction='per_sample', backend='cpu')\n"
        "torch.save([out, b, pred.grad, target.grad], sys.argv[1])\n")
    results = []
    for isa in ("portable", "avx2"):
        path = tmp_path / f"{isa}.pt"
        run = run_with_cpu_isa(isa, script, tmp_path, str(path))
        assert run.returncode == 0, run.stderr
        results.append(torch.load(path))
    assert results[1][2].dtype == torch.float16 and results[1][2].isinf().any()
    for a, b in zip(*results):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


# ----------------------------------------------------------------------------- higher order, torch.func, compile
def _likelihood(loss, reduction="batchmean", logvar_shape=None):
    """fn(backend, pred, target[, logvar]) of one loss, for the checks of transforms.py."""
    def fn(backend, pred, target, *logvar):
        if loss == "gaussian":
            return pyvae.gaussian_nll(pred, target, logvar[0] if logvar else 0.3, reduction=reduction, backend=backend)
        return LOSSES[loss](pred, target, reduction=reduction, backend=backend)
    return fn


def _likelihood_inputs(loss, shape, gen, logvar_shape=None):
    pred = randn(*shape, gen=gen, scale=1.0 if loss == "gaussian" else 3.0)
    inputs = [pred, rand(*shape, gen=gen)]
    return inputs + ([randn(*logvar_shape, gen=gen, scale=0.3)] if logvar_shape else [])


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_float64_reference(loss, reduction, gen):
    logvar_shape = (1, 4) if loss == "gaussian" else None
    inputs = [t.double().requires_grad_() for t in _likelihood_inputs(loss, (3, 4), gen, logvar_shape)]
    fn = _likelihood(loss, reduction)
    assert torch.autograd.gradgradcheck(lambda *xs: fn("torch", *xs), inputs)


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "likelihood"))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "per_sample", "none"])
@pytest.mark.parametrize("logvar_shape", [None, (5,), (3, 5)], ids=["fixed", "shared", "per_element"])
def test_second_order_gradients_match_reference(backend, loss, reduction, logvar_shape, gen):
    # the fused backends once gave all-zero second-order gradients, with only a warning
    if logvar_shape is not None and loss != "gaussian":
        pytest.skip("a log-variance is the Gaussian's")
    inputs = _likelihood_inputs(loss, (3, 5), gen, logvar_shape)
    transforms.assert_second_order_matches_reference(_likelihood(loss, reduction), backend, inputs)


@pytest.mark.parametrize("backend", pyvae.backends.available("cpu", "likelihood"))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "per_sample"])
def test_torch_func_transforms_match_loop(backend, loss, reduction, gen):
    batched = _likelihood_inputs(loss, (3, 4, 6), gen, (3, 6) if loss == "gaussian" else None)
    transforms.assert_func_transforms_match_loop(_likelihood(loss, reduction), backend, batched)


@pytest.mark.parametrize("pair", compile_pairs("likelihood"), ids=pair_id)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_compiles_in_bounded_time_without_recompiles(pair, dynamic, loss):
    # the torch backend's likelihoods broke the graph (fullgraph=True failed)
    device, backend = pair

    def make(size):
        return [t.to(device) for t in _likelihood_inputs(loss, (4 + size, 6), torch.Generator().manual_seed(size),
                                                         (6,) if loss == "gaussian" else None)]

    transforms.assert_compiles_once(_likelihood(loss), backend, make, dynamic)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_gaussian_nll_tiny_variance(pair):
    device, backend = pair
    mean = torch.tensor([[0.0, 0.0]], device=device)
    target = torch.tensor([[0.0, 1e-20]], device=device)
    logvar = torch.full((1, 2), -100.0, device=device)
    out = pyvae.gaussian_nll(mean, target, logvar, full=False, reduction="none", backend=backend)
    # The README's limit: below logvar = -88.7, exp(-logvar) overflows float32 on every backend, so
    # the loss is NaN (0 * inf) where target == mean and inf elsewhere, although the float64 formula
    # gives [-50, 1.3e3].
    torch.testing.assert_close(out.cpu(), torch.tensor([[math.nan, math.inf]]), equal_nan=True)


# ------------------------------------------------------------------------------ constants shared with C++
def _cpu_backends_using_the_constants():
    found = [b for b in ("cpu", "triton") if b in pyvae.backends.available("cpu", "likelihood")]
    if not found:
        pytest.skip("neither the cpu nor the triton backend serves CPU tensors here")
    return found


def _block_sensitive_row(block: int) -> torch.Tensor:
    """pred - target for a row of two column blocks, whose per-element values (0.5 (pred - target)^2
    of a unit-variance Gaussian) sum to 2^23 + 1 in blocks of ``block`` columns (each block's sum,
    then the blocks in order, all exact: 2^23, then 0.5 + 0.5), and to 2^23 in larger or smaller
    blocks added in order (2^23 + 0.5 rounds to even, twice). The halves are the first and last
    columns of the second block: in different chunks and lanes of every kernel's inner loop."""
    diff = torch.zeros(2 * block)
    diff[0] = 2.0 ** 12  # 0.5 * 2^24 = 2^23
    diff[block] = diff[2 * block - 1] = 1.0  # 0.5 each
    return diff


def test_likelihood_column_block_is_the_same_on_every_backend():
    """Per-sample sums add the column blocks' partial sums in order: a row crossing one block gives
    the same bits on the cpu and triton backends, those of blocks of LIKELIHOOD_COLUMN_BLOCK."""
    from pyvae._constants import LIKELIHOOD_COLUMN_BLOCK as block

    diff = _block_sensitive_row(block).expand(2, -1)
    target = torch.randn(2, 2 * block).round()  # integers: pred - target stays exact
    pred = target + diff
    expected = torch.tensor([2.0 ** 23 + 1.0] * 2)
    for backend in _cpu_backends_using_the_constants():
        out = pyvae.gaussian_nll(pred, target, full=False, reduction="per_sample", backend=backend)
        assert torch.equal(out, expected), backend


def test_triton_likelihood_kernel_reads_its_column_block(monkeypatch):
    """The Triton kernel takes the block as a constexpr: with a smaller one the same row sums as
    blocks of that size (a kernel with a block of its own would give 2^23)."""
    if "triton" not in pyvae.backends.available("cpu", "likelihood"):
        pytest.skip("needs the triton backend on CPU tensors")
    from pyvae.kernels import likelihood as triton_likelihood

    block = 4096
    monkeypatch.setattr(triton_likelihood, "LIKELIHOOD_COLUMN_BLOCK", block)
    pred = _block_sensitive_row(block)[None]
    out = pyvae.gaussian_nll(pred, torch.zeros_like(pred), full=False, reduction="per_sample", backend="triton")
    assert out.item() == 2.0 ** 23 + 1.0


def test_logvar_group_rows_is_the_same_on_every_backend():
    """A batch-shared log-variance's gradient comes as sums over LOGVAR_GROUP_ROWS rows: the same
    shape from the C++ op, its Triton twin and the fake kernel, with each group's sum, for a batch
    that crosses a group boundary."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyvae._constants import LOGVAR_GROUP_ROWS as group

    rows = 2 * group + 3
    pred, target, logvar = torch.randn(rows, 5), torch.randn(rows, 5), 0.3 * torch.randn(1, 5)
    flags = LikelihoodFlag.GRAD_LOGVAR | LikelihoodFlag.GROUP_LOGVAR_GRAD
    # d/dlogvar of 0.5 ((t - p)^2 e^-v + v), per element, summed over each group of rows
    per_element = 0.5 * (1 - (target.double() - pred.double()) ** 2 * torch.exp(-logvar.double()))
    expected = torch.stack([group_rows.sum(0) for group_rows in per_element.split(group)])
    for backend in _cpu_backends_using_the_constants():
        op = getattr(torch.ops.pyvae, "likelihood_forward_triton" if backend == "triton" else "likelihood_forward")
        (grad_logvar,) = op("gaussian", pred, target, logvar, 0.0, 0.0, flags, 1.0)[1]
        assert grad_logvar.shape == (3, 5), backend
        torch.testing.assert_close(grad_logvar.double(), expected, rtol=1e-5, atol=1e-5, msg=backend)
    if pyvae.backends.native_extension() is not None:
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) for t in (pred, target, logvar)]
            (grad_logvar,) = torch.ops.pyvae.likelihood_forward("gaussian", *fake, 0.0, 0.0, flags, 1.0)[1]
        assert grad_logvar.shape == (3, 5)


@pytest.mark.skipif(pyvae.backends.native_extension() is None, reason="extension not built")
def test_an_op_without_a_derivative_raises_naming_it():
    grad = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="pyvae::scale_grad_ has no derivative"):
        torch.ops.pyvae.scale_grad_(grad * 1.0, torch.ones(()))
    buffer = torch.full((4,), 2.0)
    torch.ops.pyvae.scale_grad_(buffer, torch.full((), 3.0))  # without a gradient to take it runs
    assert torch.equal(buffer, torch.full((4,), 6.0))
