"""The discretized mixture of logistics (pyvae.discretized_mix_logistic_nll) against float64: the
reference against PixelCNN++'s own formula, every backend against the reference, layouts, data
forms, reductions, bad input, memory, autograd edge cases and the transforms."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

import pyvae
from pyvae.ops.dmol import data_grid, dmol_reference

from cases import PAIRS, compile_pairs, pair_id, skip_unless_available
from families.dmol import random_case
from probes import allocated_bytes, held_bytes
import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = pyvae.backends.available("cpu", "dmol")


def _bench_module():
    """bench/dmol.py, whose eager_dmol is VDVAE's / PixelCNN++'s formula (the benchmark's peer)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_dmol", os.path.join(REPO, "bench", "dmol.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def nll(params, x, reduction="batchmean", backend="auto", **kwargs):
    kwargs.setdefault("num_mix", 3)
    return pyvae.discretized_mix_logistic_nll(params, x, reduction=reduction, backend=backend, **kwargs)


# ------------------------------------------------------------------------------ the definition
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [256, 65536])
def test_reference_is_pixelcnnpp_formula(channels, num_classes, gen):
    params, k = random_case(4, (6, 5), 5, channels, layout="channels_last", num_classes=num_classes,
                            dtype=torch.float64, scale=2.0, generator=gen)
    x = data_grid(k, num_classes, torch.float64)
    expected = _bench_module().eager_dmol(params, x, 5, num_classes)
    got = dmol_reference(params, x, 5, num_classes, channels_last=True)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_one_component_one_channel_is_a_discretized_logistic():
    """M = 1, C = 1: the probability of class k is the logistic's mass over its bin, open-ended at
    both ends; the classes' probabilities sum to 1."""
    num_classes = 7
    mean, log_scale = 0.3, -1.2
    x = torch.arange(num_classes).reshape(1, 1, num_classes)
    params = torch.tensor([0.0, mean, log_scale], dtype=torch.float64).reshape(1, 3, 1).expand(1, 3, num_classes)
    got = nll(params, x, reduction="none", num_mix=1, num_classes=num_classes, backend="torch")[0]
    edges = torch.linspace(-1, 1, num_classes, dtype=torch.float64)
    half = 1.0 / (num_classes - 1)
    cdf = torch.sigmoid((torch.cat([edges[:-1] + half, torch.tensor([math.inf], dtype=torch.float64)]) - mean)
                        / math.exp(log_scale))
    below = torch.sigmoid((torch.cat([torch.tensor([-math.inf], dtype=torch.float64), edges[1:] - half]) - mean)
                          / math.exp(log_scale))
    torch.testing.assert_close(got, -torch.log(cdf - below), rtol=1e-12, atol=1e-12)
    assert torch.exp(-got).sum().item() == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------ every backend
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_the_reference(backend, channels, layout, dtype, gen):
    params, x = random_case(3, (9, 11), 4, channels, layout=layout, dtype=dtype, generator=gen)
    p = params.requires_grad_()
    out = nll(p, x, reduction="per_sample", backend=backend, num_mix=4, layout=layout)
    out.sum().backward()
    p64 = params.detach().double().requires_grad_()
    ref = nll(p64, x, reduction="per_sample", backend="torch", num_mix=4, layout=layout)
    ref.sum().backward()
    assert out.dtype == torch.float32 and p.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=tol, atol=tol * float(p64.grad.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_data_forms_and_reductions_agree(backend, gen):
    params, k = random_case(2, (5, 4), 3, 3, layout="channels_first", generator=gen)
    grid = data_grid(k, 256)
    per_position = nll(params, k, reduction="none", backend=backend)
    assert per_position.shape == (2, 5, 4)
    last = nll(params.movedim(1, -1), k.movedim(1, -1), reduction="none", backend=backend, layout="channels_last")
    torch.testing.assert_close(last, per_position, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(nll(params, grid, reduction="none", backend=backend), per_position)
    total = per_position.double().sum()
    for reduction, expected in (("per_sample", per_position.double().sum((1, 2))), ("sum", total),
                                ("batchmean", total / 2), ("mean", total / k.numel())):
        torch.testing.assert_close(nll(params, k, reduction=reduction, backend=backend).double(), expected,
                                   rtol=1e-5, atol=1e-4, msg=reduction)
    bits = pyvae.bits_per_dim(nll(params, k, reduction="per_sample", backend=backend), 3 * 5 * 4)
    torch.testing.assert_close(bits.double(), per_position.double().sum((1, 2)) / (60 * math.log(2)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_shapes_and_16_bit_classes(backend, gen):
    """[B, 3M, T] and [B, T, 3M] with one channel, 65536 classes; the edge classes included."""
    params, k = random_case(2, (300,), 10, 1, num_classes=65536, generator=gen)
    k[0, 0, :3] = torch.tensor([0, 65535, 1])
    out = nll(params, k, reduction="per_sample", backend=backend, num_mix=10, num_classes=65536)
    ref = nll(params.double(), k, reduction="per_sample", backend="torch", num_mix=10, num_classes=65536)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)


def test_strided_and_expanded_inputs(gen):
    params, x = random_case(2, (6, 6), 2, 3, generator=gen)
    wide = torch.stack([params, torch.zeros_like(params)], -1)[..., 0]  # a strided view of the same values
    assert not wide.is_contiguous()
    for backend in BACKENDS:
        torch.testing.assert_close(nll(wide, x, num_mix=2, backend=backend), nll(params, x, num_mix=2, backend=backend))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,words", [
    (dict(num_mix=2), "params must have shape [2, 20, 4, 4] for x of shape [2, 3, 4, 4] with num_mix=2"),
    (dict(num_mix=0), "num_mix must be a positive int"),
    (dict(num_classes=1), "num_classes must be an int in [2, 65536]"),
    (dict(num_classes=65537), "num_classes must be an int in [2, 65536]"),
    (dict(layout="nhwc"), "layout must be 'channels_first' or 'channels_last'"),
    (dict(layout="channels_last"), "x must have 1 or 3 channels (dim -1 with layout='channels_last'), got 4"),
    (dict(reduction="max"), "reduction must be one of"),
])
def test_bad_arguments_are_named(kwargs, words):
    params, x = torch.randn(2, 30, 4, 4), torch.zeros(2, 3, 4, 4)
    kwargs = {"num_mix": 3, **kwargs}
    with pytest.raises(ValueError) as error:
        pyvae.discretized_mix_logistic_nll(params, x, **kwargs)
    assert words in str(error.value)


def test_bad_data_values_are_named():
    params = torch.randn(2, 30, 4)
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\].*got values in \[-1, 1.5\]"):
        nll(params, torch.tensor([1.5, 0.0, -1.0]).repeat(2, 4, 1).transpose(1, 2))
    with pytest.raises(ValueError, match="and NaN"):
        nll(params, torch.full((2, 3, 4), math.nan))
    with pytest.raises(ValueError, match=r"integer x must be class indices in \[0, 256\), got values in \[0, 256\]"):
        nll(params, torch.tensor([0, 256, 3]).repeat(2, 4, 1).transpose(1, 2))
    with pytest.raises(TypeError, match="x must be floats in"):
        nll(params, torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="params must be a floating tensor"):
        nll(params.long(), torch.zeros(2, 3, 4))
    # validate=False skips the check (no host synchronisation): out-of-range values score as the nearest class
    out = nll(params, torch.full((2, 3, 4), 1.5), validate=False, backend="torch")
    assert torch.isfinite(out)


# ------------------------------------------------------------------------------ memory and autograd
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_forward_keeps_only_the_gradient_buffer(backend, gen):
    """For backward, one buffer of params' size (the gradient) and nothing of size B·C·M·positions:
    what forward allocates is the gradient, the data grid (x as floats) and a few small tensors."""
    params, k = random_case(4, (16, 16), 10, 3, generator=gen)
    params.requires_grad_()
    kept = []
    held = held_bytes(lambda: kept.append(nll(params, k, num_mix=10, backend=backend)))
    allocated = allocated_bytes(lambda: nll(params, k, num_mix=10, backend=backend))
    params_bytes = params.numel() * 4
    mixture_bytes = 4 * 3 * 10 * 16 * 16 * 4  # B·C·M·H·W float32 values: 0.3 params
    assert params_bytes <= held <= 1.05 * params_bytes, held
    assert allocated <= params_bytes + k.numel() * 4 + 1024 < params_bytes + mixture_bytes, allocated
    kept[0].backward()
    assert params.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_backward_twice(backend, gen):
    params, x = random_case(2, (4,), 2, 1, generator=gen)
    params.requires_grad_()
    loss = nll(params, x, num_mix=2, backend=backend)
    first = torch.autograd.grad(loss, params, retain_graph=True)[0]
    second = torch.autograd.grad(loss, params)[0]
    assert torch.equal(first, second)
    with pytest.raises(RuntimeError, match="a second time"):
        torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "per_sample", "mean"])
def test_upstream_gradients_per_position_and_per_sample(backend, reduction, gen):
    params, x = random_case(2, (3, 4), 2, 3, generator=gen)
    params.requires_grad_()
    out = nll(params, x, num_mix=2, reduction=reduction, backend=backend)
    weights = torch.rand(out.shape, generator=gen)
    (got,) = torch.autograd.grad(out, params, weights)
    p64 = params.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(nll(p64, x, num_mix=2, reduction=reduction, backend="torch"), p64,
                                      weights.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64_reference(gen):
    for channels in (1, 3):
        params, x = random_case(2, (3,), 2, channels, num_classes=7, dtype=torch.float64, generator=gen)
        for reduction in ("none", "batchmean"):
            def fn(p):
                return nll(p, x, num_mix=2, num_classes=7, reduction=reduction, backend="torch")
            assert torch.autograd.gradcheck(fn, (params.requires_grad_(),))
            assert torch.autograd.gradgradcheck(fn, (params,))


def _dmol_case(x):
    def fn(backend, params):
        return pyvae.discretized_mix_logistic_nll(params, x, num_mix=2, reduction="per_sample", backend=backend)
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_gradients_match_reference(backend, gen):
    params, x = random_case(2, (3, 2), 2, 3, generator=gen)
    transforms.assert_second_order_matches_reference(_dmol_case(x), backend, [params])


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_transforms_match_loop(backend, gen):
    params, x = random_case(3, (2, 2), 2, 1, generator=gen)
    # vmap over a leading dim of params: each slice is one [3, P, 2, 2] problem with the same x
    transforms.assert_func_transforms_match_loop(_dmol_case(x), backend, [torch.stack([params, 0.5 * params])])


@pytest.mark.parametrize("pair", compile_pairs("dmol"), ids=pair_id)
def test_compiles_in_bounded_time_without_recompiles(pair):
    device, backend = pair
    skip_unless_available(pair, "dmol")

    def fn(backend, params):
        x = torch.zeros(params.shape[0], 1, params.shape[2], device=params.device)
        return pyvae.discretized_mix_logistic_nll(params, x, num_mix=2, backend=backend)

    def make(size):
        return [torch.randn(size + 2, 6, 5, device=device)]

    transforms.assert_compiles_once(fn, backend, make, dynamic=False)


@pytest.mark.parametrize("pair", [p for p in PAIRS if p[1] != "torch"], ids=pair_id)
def test_no_tensor_of_the_data_grid_when_x_is_float(pair, gen):
    """Float data is read as it is: no conversion pass (the integer form converts once)."""
    device, backend = pair
    skip_unless_available(pair, "dmol")
    params, k = random_case(2, (8, 8), 2, 3, device=device, generator=gen)
    x = data_grid(k, 256)
    assert data_grid(x, 256) is x
    nll(params, x, num_mix=2, backend=backend)


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_same_seed_same_sample_on_every_backend(backend, channels, layout, gen):
    params, _ = random_case(3, (7, 5), 4, channels, layout=layout, generator=gen)
    kwargs = dict(num_mix=4, channels=channels, layout=layout)
    got = pyvae.discretized_mix_logistic_sample(params, seed=11, backend=backend, **kwargs)
    expected = pyvae.discretized_mix_logistic_sample(params.double(), seed=11, backend="torch", **kwargs)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert got.min() >= -1 and got.max() <= 1
    # the float32 logs of the noise round differently across backends (a component choice between
    # two scores that close could too: not in these cases)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, pyvae.discretized_mix_logistic_sample(params, seed=11, backend=backend, **kwargs))
    assert not torch.equal(got, pyvae.discretized_mix_logistic_sample(params, seed=12, backend=backend, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_distribution_and_temperature(backend):
    """Two grey components, the second 3 times as likely: the share of values near each component's
    mean and the sample's mean; temperature 0 gives the likely component's mean everywhere."""
    positions = 4000 if backend != "triton" else 1000
    logits = torch.tensor([0.0, math.log(3.0)])
    means, log_scales = torch.tensor([-0.5, 0.5]), torch.tensor([-3.0, -3.0])
    params = torch.cat([logits, means, log_scales]).reshape(1, 6, 1).expand(1, 6, positions).contiguous()
    x = pyvae.discretized_mix_logistic_sample(params, num_mix=2, channels=1, seed=3, backend=backend)[0, 0]
    assert abs((x > 0).double().mean().item() - 0.75) < 0.05
    assert abs(x.double().mean().item() - 0.25) < 0.05
    cold = pyvae.discretized_mix_logistic_sample(params, num_mix=2, channels=1, seed=3, temperature=0.0,
                                                 backend=backend)
    assert torch.equal(cold, torch.full_like(cold, 0.5))


def test_mixture_mean_and_quantize():
    params = torch.tensor([0.0, 0.0, -0.5, 0.5, -3.0, -3.0]).reshape(1, 6, 1)
    mean = pyvae.discretized_mix_logistic_mean(params, num_mix=2, channels=1)
    torch.testing.assert_close(mean, torch.zeros(1, 1, 1))
    from pyvae.ops.dmol import quantize
    assert quantize(torch.tensor([-1.0, 1.0, 0.0, 2.0]), 256).tolist() == [0, 255, 128, 255]


def test_sample_bad_arguments_are_named():
    params = torch.randn(2, 30, 4)
    with pytest.raises(ValueError, match="params must have 9 parameters per position in dim 1"):
        pyvae.discretized_mix_logistic_sample(params, num_mix=3, channels=1)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        pyvae.discretized_mix_logistic_sample(params, num_mix=3, channels=3, temperature=-1.0)
    with pytest.raises(ValueError, match="seed must be in"):
        pyvae.discretized_mix_logistic_sample(params, num_mix=3, channels=3, seed=-1)
