"""The decisions of tests/probes.py on recorded data, on the CPU: the GPU tests that rely on them
(launch counts, sync-free runs) only run on a GPU."""
import types

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from probes import allocated_bytes, assert_launches, device_event_names, held_bytes


def _event(name, device_type):
    return types.SimpleNamespace(name=name, device_type=getattr(torch.autograd.DeviceType, device_type))


def test_launch_count_skips_when_the_profiler_recorded_no_device_event():
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # what a profiler without CUPTI gives
        torch.ones(8).add_(1)
    assert prof.events() and device_event_names(prof.events()) == []
    with pytest.raises(pytest.skip.Exception, match="no CUDA kernel at all"):
        assert_launches(device_event_names(prof.events()), expected=1)


def test_launch_count_is_what_ran_before_the_probe():
    events = [_event("aten::add_", "CPU"), _event("reparam_kl_kernel", "CUDA"), _event("probe", "CUDA")]
    assert device_event_names(events) == ["reparam_kl_kernel", "probe"]
    assert_launches(device_event_names(events), expected=1)
    for names in (["probe"], ["reparam_kl_kernel", "Memset (Device)", "probe"]):  # none, or two
        with pytest.raises(AssertionError, match="expected 1 launch"):
            assert_launches(names, expected=1)


def test_allocated_and_held_bytes():
    x = torch.ones(1000)
    assert 4000 <= allocated_bytes(lambda: torch.empty(1000)) < 4000 + 1024
    assert 8000 <= allocated_bytes(lambda: x * 2 + 1) < 8000 + 1024  # a temporary and the result
    assert 4000 <= held_bytes(lambda: x * 2 + 1) < 4000 + 1024  # the result only
    assert allocated_bytes(lambda: None) == held_bytes(lambda: None) == 0
