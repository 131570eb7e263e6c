"""The runner's plumbing: where results go, the summary lines, the quiet profiler, the CPU time
budget. (Timing cases themselves are in test_bench_<op>.py.)"""
import os

import pytest
import torch

import harness
import run


def test_default_run_does_not_write_over_the_full_results(tmp_path):
    full = run.results_dir("cpu", full=True)
    assert full == harness.RESULTS / "cpu"
    assert run.results_dir("cpu", full=False) == full / "headline"
    assert run.results_dir("cpu", full=False, out=tmp_path) == tmp_path


def _row(provider, ms, peak=None, mode="forward", cuda_graph=False):
    return harness.Row("reparam_kl", "4096x1024", "float32", mode, provider, ms, ms, ms, 0, 0.0, 0.0, None,
                       peak, None, cuda_graph)


def test_summary_compares_the_fastest_pyvae_with_eager_and_the_faster_compile():
    rows = [_row("eager", 30.0, peak=96 * 2**20), _row("torch.compile", 90.0),
            _row("torch.compile max-autotune", 60.0), _row("pyvae cpu", 6.0, peak=24 * 2**20),
            _row("pyvae triton", 12.0), _row("pyvae cpu", 1.0, cuda_graph=True)]  # graph rows are not summarised
    (line,) = harness.summary(rows)
    assert line.startswith("reparam_kl 4096x1024 forward")
    assert "pyvae cpu 6.0 ms" in line
    assert "5.0x eager 30.0 ms" in line
    assert "10.0x torch.compile 60.0 ms" in line  # the faster of the two compile modes
    assert "peak mem 24.0 MiB (0.25x eager's 96.0 MiB)" in line


def test_summary_names_a_missing_compile_and_one_line_per_mode():
    rows = [_row("eager", 4.0), _row("pyvae cpu", 2.0),
            _row("eager", 8.0, mode="step"), _row("vector-quantize-pytorch", 16.0, mode="step"),
            _row("pyvae cpu", 2.0, mode="step")]
    first, second = harness.summary(rows)
    assert "2.0x eager" in first and "no torch.compile" in first
    assert "4.0x eager" in second and "8.0x vector-quantize-pytorch 16.0 ms" in second


def test_peak_memory_is_silent_and_still_measures(capfd):
    x = torch.randn(1000, 1000)
    peak = harness.peak_memory("cpu", lambda: os.write(2, b"native noise\n") and x * 2)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the profiler's USDT lines and the step's own fd-2 write are gone
    assert 4_000_000 <= peak < 4_000_000 + 4096  # x * 2, give or take a small bookkeeping allocation
    print("after")
    os.write(2, b"stderr back\n")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == "stderr back\n"  # and fds 1 and 2 are restored


def test_time_budget_cuts_the_rounds_but_not_below_the_minimum():
    calls = {"slow": 0, "fast": 0}

    def counter(name):
        def fn():
            calls[name] += 1
        return fn

    fns = {k: counter(k) for k in calls}
    harness.time_cpu_interleaved(fns, reps=1000, warmup=1, budget_s=0.0)
    assert calls == {"slow": 1 + harness.MIN_CPU_REPS, "fast": 1 + harness.MIN_CPU_REPS}
    calls.update(slow=0, fast=0)
    harness.time_cpu_interleaved(fns, reps=50, warmup=2)
    assert calls == {"slow": 52, "fast": 52}


@pytest.mark.parametrize("suite", list(run.SUITES.values()), ids=list(run.SUITES))
def test_headline_cases_are_the_first_cases_of_the_full_sweep(suite):
    assert 0 < suite.n_cases("cpu", False) <= suite.n_cases("cpu", True)
