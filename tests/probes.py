"""What a test measures about an op besides its values: the bytes it allocates and holds, the CUDA
kernels it launches, and that it runs without a host synchronisation. Each decision is a plain function of what
was recorded, so the CPU suite covers it (test_probes.py) although the GPU cases only run on a GPU."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import pyvae


def _memory_events(fn) -> list[int]:
    """The sizes of the CPU allocations (> 0) and frees (< 0) the profiler records while ``fn()`` runs,
    pyvae's CPU buffer cache emptied first (so a buffer it would hand out again is allocated anew);
    fn's result lives until the profile ends."""
    from torch.profiler import ProfilerActivity, profile
    pyvae.backends.empty_cpu_cache()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()  # noqa: F841
    return [ev.nbytes() for ev in prof.profiler.kineto_results.events() if ev.name() == "[memory]"]


def allocated_bytes(fn) -> int:
    """Bytes that ``fn()`` allocates on the CPU, freed or not."""
    return sum(n for n in _memory_events(fn) if n > 0)


def held_bytes(fn) -> int:
    """Bytes that ``fn()`` allocates on the CPU and still holds when it returns: its result and
    whatever that keeps alive (autograd's saved tensors and its Functions' ctx attributes)."""
    return sum(_memory_events(fn))


def device_event_names(events) -> list[str]:
    """The names of the events a profiler recorded on a CUDA device (kernels, copies, memsets), in
    time order (``profile.events()`` is sorted by start time)."""
    return [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]


def assert_launches(names: list[str], expected: int, probe: int = 1) -> None:
    """The verdict of a launch-count test from ``device_event_names`` of a profile of the op
    followed by ``probe`` launches of an ordinary torch op: skip when the profiler recorded no
    device event at all (no CUPTI activity here: nothing is measured, so nothing passes), else
    exactly ``expected`` launches before the probe's."""
    if not names:
        pytest.skip("the profiler recorded no CUDA kernel at all (not even a torch op's): no launch count here")
    op = names[:max(len(names) - probe, 0)]
    assert len(names) >= probe and len(op) == expected, (
        f"expected {expected} launch(es) and then the probe's {probe}, the profiler recorded {names}")


def count_launches(fn, expected: int) -> None:
    """Profiles ``fn()`` and then one kernel of an ordinary torch op (a profiler that records that
    one can count launches; one that records nothing at all cannot) on the current CUDA device, and
    applies :func:`assert_launches`."""
    from torch.profiler import ProfilerActivity, profile
    probe = torch.zeros((), device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
        probe.add_(1)  # one elementwise kernel
        torch.cuda.synchronize()
    assert_launches(device_event_names(prof.events()), expected)


@contextmanager
def no_host_sync(device):
    """On a CUDA device, runs the block with torch.cuda's sync debug mode at "error", so that a host
    synchronisation raises, after checking that the mode does catch one here (``.item()``); on the
    CPU, where there is nothing to catch, the block just runs (the test's value checks still do)."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        caught = False
        try:
            torch.zeros((), device=device).item()
        except RuntimeError:
            caught = True
        assert caught, "sync debug mode 'error' let .item() synchronise: it would not catch the op's syncs either"
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
