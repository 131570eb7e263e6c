"""Checks that every op family's tests apply to its public functions: second-order gradients
against the float64 reference, the ``torch.func`` transforms against the same calls in a loop, and
the bounds of ``torch.compile`` (time of the first call, no recompiles after it). Each family's
test file supplies its cases (a function of tensors built for a backend and a dtype)."""
from __future__ import annotations

import functools
import time
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
import torch._dynamo.testing
from torch.func import grad, vjp, vmap

# A function of a family under test: fn(backend, *tensors) -> a tensor or a tuple of tensors
Case = Callable[..., object]


@contextmanager
def autograd_warnings_fail():
    """PyTorch only warns when it differentiates through an op without an autograd kernel (and gives
    zero gradients): make that a failure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        warnings.filterwarnings("error", message=".*performance drop because we have not yet implemented the batch.*")
        yield


def scalar(out) -> torch.Tensor:
    """A scalar of every floating output, non-linear in each element (so that second-order terms of
    every output and element show up) and without weights of the output's size (which torch.compile
    would specialise on)."""
    outs = out if isinstance(out, tuple) else (out,)
    total = 0.0
    for o in outs:
        if o.is_floating_point():
            total = total + (o * (1.0 + 0.5 * torch.sin(o))).sum() + (o * o).sum()
    return total


def second_order(fn: Case, backend: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d/d inputs of |d scalar(fn(inputs)) / d inputs|^2: a backward with create_graph=True, then
    another backward through it."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with autograd_warnings_fail():
        first = torch.autograd.grad(scalar(fn(backend, *leaves)), leaves, create_graph=True)
        return list(torch.autograd.grad(sum((g * g).sum() for g in first), leaves))


def assert_second_order_matches_reference(fn: Case, backend: str, inputs: list[torch.Tensor],
                                          rtol: float = 2e-4) -> None:
    """Second-order gradients on ``backend`` (float32 inputs) equal the float64 reference's, relative
    to the largest of each (the float32 first-order gradients they are built from round at ~1e-7)."""
    expected = second_order(fn, "torch", [t.double() for t in inputs])
    got = second_order(fn, backend, [t.float() for t in inputs])
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.abs().max() > 0 or e.abs().max() == 0, f"input {i}: all-zero second-order gradient on {backend}"
        torch.testing.assert_close(g.double(), e, rtol=0, atol=rtol * float(e.abs().max()),
                                   msg=lambda m: f"input {i} on {backend}: {m}")


def assert_func_transforms_match_loop(fn: Case, backend: str, batched: list[torch.Tensor],
                                      atol: float = 1e-5) -> None:
    """``torch.func.grad``, ``vjp`` and ``vmap`` (and vmap of grad, grad of vmap) over ``fn`` on
    ``backend`` against ``torch.autograd`` and a Python loop over the first dim of ``batched``."""
    def loss(*xs):
        return scalar(fn(backend, *xs))

    n = batched[0].shape[0]
    first = [t[0] for t in batched]
    with autograd_warnings_fail():
        leaves = [t.detach().requires_grad_() for t in first]
        expected = torch.autograd.grad(loss(*leaves), leaves)
        got = grad(loss, argnums=tuple(range(len(first))))(*first)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=atol, rtol=1e-5, msg="torch.func.grad")
        out, pullback = vjp(lambda *xs: fn(backend, *xs), *first)
        cotangent = tuple(torch.ones_like(o) for o in out) if isinstance(out, tuple) else torch.ones_like(out)
        pulled = pullback(cotangent)
        leaves = [t.detach().requires_grad_() for t in first]
        eager = fn(backend, *leaves)
        eager_sum = sum(o.sum() for o in eager if o.is_floating_point()) if isinstance(eager, tuple) else eager.sum()
        for g, e in zip(pulled, torch.autograd.grad(eager_sum, leaves)):
            torch.testing.assert_close(g, e, atol=atol, rtol=1e-5, msg="torch.func.vjp")

        looped = [fn(backend, *(t[i] for t in batched)) for i in range(n)]
        mapped = vmap(lambda *xs: fn(backend, *xs))(*batched)
        for j, m in enumerate(mapped if isinstance(mapped, tuple) else (mapped,)):
            expected_j = torch.stack([(o[j] if isinstance(o, tuple) else o) for o in looped])
            torch.testing.assert_close(m, expected_j, atol=atol, rtol=1e-5, msg=f"vmap, output {j}")

        per_slice = [torch.func.grad(loss, argnums=tuple(range(len(batched))))(*(t[i] for t in batched))
                     for i in range(n)]
        mapped_grads = vmap(grad(loss, argnums=tuple(range(len(batched)))))(*batched)
        for k, m in enumerate(mapped_grads):
            torch.testing.assert_close(m, torch.stack([p[k] for p in per_slice]), atol=atol, rtol=1e-5,
                                       msg=f"vmap(grad), input {k}")
        grads_of_map = grad(lambda *xs: vmap(loss)(*xs).sum(), argnums=tuple(range(len(batched))))(*batched)
        for k, m in enumerate(grads_of_map):
            torch.testing.assert_close(m, torch.stack([p[k] for p in per_slice]), atol=atol, rtol=1e-5,
                                       msg=f"grad(vmap), input {k}")


COMPILE_SECONDS = 30.0


@functools.lru_cache(maxsize=None)
def _warm_up_inductor() -> None:
    """Inductor's own start-up (imports, the C++ compiler's first run) on a function of no op of
    pyvae's, once per process, so that the time bound is on compiling pyvae's ops."""
    x = torch.randn(4, 3, requires_grad=True)
    torch.compile(lambda t: (t.sin() * t).sum(), fullgraph=True)(x).backward()
    torch._dynamo.reset()


def assert_compiles_once(fn: Case, backend: str, make_inputs: Callable[[int], list[torch.Tensor]],
                         dynamic: bool) -> float:
    """``torch.compile(fullgraph=True)`` of fn's forward and backward: the first call within
    COMPILE_SECONDS, and no compile after it on new inputs (of a new size when ``dynamic``).
    Returns the seconds of the first call."""
    _warm_up_inductor()
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda *xs: scalar(fn(backend, *xs)), fullgraph=True, dynamic=dynamic, backend=counter)

    def step(size):
        leaves = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(size)]
        compiled(*leaves).backward()

    start = time.perf_counter()
    step(0)
    seconds = time.perf_counter() - start
    compiled_frames = counter.frame_count
    for size in (0, 1, 2) if dynamic else (0, 0):
        step(size)
    assert counter.frame_count == compiled_frames, f"recompiled: {counter.frame_count} frames after {compiled_frames}"
    assert seconds < COMPILE_SECONDS, f"the first compiled call took {seconds:.1f} s"
    return seconds
