"""Timing, traffic and result files shared by the op benchmarks (bench/<op>.py) and the runner.

GPU: CUDA events through ``triton.testing.do_bench`` (L2 flushed between runs) and, for small
shapes, ``do_bench_cudagraph``. CPU: ``time.perf_counter`` medians over many runs, with the
providers of one case interleaved round by round so machine noise hits them alike.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Seconds of timed runs per provider of one CPU case, or None for the fixed repetition counts of
# time_case. The runner's default (headline) sweep sets it so that a slow eager baseline (seconds a
# call) is timed a few times rather than fifteen; the full sweep leaves it None.
CPU_TIME_BUDGET_S: float | None = None
MIN_CPU_REPS = 5


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    mode: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes_moved: int
    gbps: float
    pct_copy: float
    saved_bytes: int | None
    peak_mem_bytes: int | None
    speedup_vs_eager: float | None = None
    cuda_graph: bool = False
    tflops: float | None = None
    note: str = ""  # e.g. how often a reduced-precision provider departs from the exact one


def device_slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# Dense tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, by device-name fragment:
# (16-bit inputs, TF32 inputs). The H200 has the H100 SXM's compute.
_TENSOR_CORE_PEAKS = (("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 418.0), ("H100", 989.4, 494.7),
                      ("H200", 989.4, 494.7), ("A100", 312.0, 156.0))


def tensor_core_peak_tflops(device: str, dtype: torch.dtype) -> float | None:
    """The device's dense tensor-core peak for products of ``dtype`` inputs (float32 counts as
    TF32), or None for a device not in the table."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak_16bit, peak_tf32 in _TENSOR_CORE_PEAKS:
        if fragment in name:
            return peak_tf32 if dtype == torch.float32 else peak_16bit
    return None


def environment(device: str) -> dict:
    """Device, versions and date written into every result row."""
    import pyvae
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name()
    return {
        "device": device, "device_name": name, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "pyvae": pyvae.__version__,
        "python": platform.python_version(), "commit": _git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _percentiles(samples_ms: list[float]) -> Timing:
    qs = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return Timing(statistics.median(samples_ms), qs[1], qs[7])


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 3,
                         budget_s: float | None = None) -> dict[str, Timing]:
    """perf_counter timings of several candidates, interleaved round by round.

    With ``budget_s``, the rounds stop early once they have taken about ``budget_s`` seconds per
    candidate (never before MIN_CPU_REPS rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for done in range(1, reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and done >= MIN_CPU_REPS and time.perf_counter() - start >= budget_s * len(fns):
            break
    return {k: _percentiles(v) for k, v in samples.items()}


def time_gpu(fn: Callable[[], object], cuda_graph: bool = False) -> Timing:
    import triton.testing

    if cuda_graph:
        q = triton.testing.do_bench_cudagraph(fn, rep=200, quantiles=[0.5, 0.2, 0.8])
    else:
        q = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    return Timing(*q)


def copy_bandwidth(device: str, nbytes: int, reps: int = 30) -> float:
    """GB/s of a device-to-device copy of nbytes (counting bytes read plus bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device == "cpu":
        t = time_cpu_interleaved({"copy": lambda: dst.copy_(src)}, reps)["copy"]
    else:
        t = time_gpu(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd keeps for backward while running fn (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_memory(device: str, fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated above the starting point while running fn once (its outputs included).

    CUDA: the caching allocator's peak statistics. CPU: the profiler's memory events (every
    allocation and free through PyTorch's CPU allocator, ``at::empty`` inside C++ ops included, and
    pyvae's output-buffer cache, which reports the tensors it hands out and takes back the same
    way), summed in time order. Like CUDA's, it counts live tensors, not blocks held in a cache."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    if device != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile
    with _native_output_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events()
                    if ev.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_output_silenced():
    """Sends file descriptors 1 and 2 to /dev/null for the duration: the profiler's C++ side logs
    (``USDT ... profiler_start``, "Memory block of unknown size ...") straight to them, past Python."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _libc_fflush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        _libc_fflush()  # what C stdio buffered while silenced goes to /dev/null, not to the terminal later
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _libc_fflush() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


@dataclass
class Case:
    """One benchmark case: the providers' ready-to-call steps on the same inputs."""
    op: str
    shape: str
    dtype: torch.dtype
    mode: str  # "forward" or "forward+backward"
    steps: dict  # provider name -> zero-argument callable
    traffic_bytes: int  # minimal logical traffic of one step
    numel: int
    flops: int | None = None  # for compute-bound ops (VQ: 2 N K D), reported as TFLOP/s


def time_case(case: Case, device: str, label: str = "") -> list[Row]:
    """Times every provider of a case (interleaved on the CPU; CUDA events, and for small cases
    CUDA graphs too, on a GPU) and returns one row per provider, with speed-up over "eager"."""
    rows: list[Row] = []
    copy_gbps = copy_bandwidth(device, max(case.traffic_bytes // 2, 1 << 20))
    graph_flags = [False] + ([True] if device != "cpu" and case.numel <= 1 << 16 else [])
    backward = case.mode != "forward"
    for graph in graph_flags:
        if device == "cpu":
            budget = CPU_TIME_BUDGET_S
            timings = time_cpu_interleaved(case.steps, reps=200 if case.numel <= 1 << 16 else
                                           40 if case.numel <= 1 << 22 else 15,
                                           warmup=3 if budget is None else 1, budget_s=budget)
        else:
            timings = {}
            for name, step in case.steps.items():
                try:
                    timings[name] = time_gpu(step, cuda_graph=graph)
                except Exception as exc:  # one provider failing (e.g. to capture) must not end the run
                    print(f"[bench] {case.op} {label or case.shape} {case.mode} {name}"
                          f"{' (CUDA graph)' if graph else ''} failed: {exc!r}")
        eager_ms = timings["eager"].median_ms if "eager" in timings else float("nan")
        for name, t in timings.items():
            gbps = case.traffic_bytes / (t.median_ms * 1e-3) / 1e9
            saved: list[int] = []  # one run measures both: a slow eager step costs seconds a call
            step = case.steps[name]
            peak = peak_memory(device, (lambda s: lambda: saved.append(saved_tensor_bytes(s)))(step)
                               if backward else step)
            rows.append(Row(case.op, case.shape, str(case.dtype).replace("torch.", ""), case.mode, name,
                            t.median_ms, t.p20_ms, t.p80_ms, case.traffic_bytes, gbps, 100 * gbps / copy_gbps,
                            saved[0] if backward else None, peak,
                            eager_ms / t.median_ms, graph,
                            case.flops / (t.median_ms * 1e-3) / 1e12 if case.flops else None))
    return rows


def write_results(rows: list[Row], env: dict, out_dir: Path, name: str, command: str) -> list[Path]:
    """CSV (one row per provider x shape x mode, with device, versions and date) + markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    fields = list(env) + list(asdict(rows[0])) + ["command"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            d = asdict(row)
            writer.writerow({**env, **d, "command": command})
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown_table(rows, env, command))
    return [csv_path, md_path]


def markdown_table(rows: list[Row], env: dict, command: str) -> str:
    lines = [
        f"# {rows[0].op.split()[0]} on {env['device_name']} ({env['device']})",
        "",
        f"`{command}`, {env['date']}, commit {env['commit']}; torch {env['torch']}, triton {env['triton']}, "
        f"pyvae {env['pyvae']}, python {env['python']}, {env['threads']} CPU threads.",
        "",
        "Times are medians (p20-p80) in ms. GB/s counts the minimal logical traffic (inputs read once, "
        "outputs written once); % copy is that rate over a device copy measured in the same run. "
        "Peak mem: the most memory allocated above the starting point during one call, outputs "
        "included (CPU: live tensors as the profiler's memory events record them).",
        "",
        "| op | shape | dtype | mode | provider | median ms | p20-p80 ms | GB/s | % copy | TFLOP/s | x eager | saved for bwd | peak mem | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def mib(b):
            return "" if b is None else f"{b / 2**20:.1f} MiB"
        speed = "" if r.speedup_vs_eager is None else f"{r.speedup_vs_eager:.2f}"
        graph = " (CUDA graph)" if r.cuda_graph else ""
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider}{graph} | {r.median_ms:.4f} | "
                     f"{r.p20_ms:.4f}-{r.p80_ms:.4f} | {r.gbps:.1f} | {r.pct_copy:.0f}% | "
                     f"{'' if r.tflops is None else f'{r.tflops:.2f}'} | {speed} | "
                     f"{mib(r.saved_bytes)} | {mib(r.peak_mem_bytes)} | {r.note} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[Row]) -> list[str]:
    """One line per op, shape, dtype (named when not float32) and mode: the fastest pyvae provider's
    median, its speed-up over eager, the faster torch.compile mode and (where measured)
    vector-quantize-pytorch with their medians, and its peak memory against eager's."""
    def ms(t):
        return f"{t:.1f} ms" if t >= 1 else f"{t:.3f} ms"

    def mib(b):
        return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"

    lines = []
    cases = dict.fromkeys((r.op, r.shape, r.dtype, r.mode) for r in rows if not r.cuda_graph)
    for case in cases:
        of = [r for r in rows if (r.op, r.shape, r.dtype, r.mode) == case and not r.cuda_graph]
        ours = [r for r in of if r.provider.startswith("pyvae")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r.median_ms)
        parts = []
        for label, prefix in (("eager", "eager"), ("torch.compile", "torch.compile"),
                              ("vector-quantize-pytorch", "vector-quantize-pytorch")):
            others = [r for r in of if r.provider == prefix or r.provider.startswith(prefix + " ")]
            if others:
                other = min(others, key=lambda r: r.median_ms)
                parts.append(f"{other.median_ms / best.median_ms:5.1f}x {label} {ms(other.median_ms)}")
            elif label != "vector-quantize-pytorch":
                parts.append(f"no {label}")
        eager = next((r for r in of if r.provider == "eager"), None)
        if best.peak_mem_bytes is not None and eager is not None and eager.peak_mem_bytes:
            parts.append(f"peak mem {mib(best.peak_mem_bytes)} ({best.peak_mem_bytes / eager.peak_mem_bytes:.2f}x "
                         f"eager's {mib(eager.peak_mem_bytes)})")
        op, shape, dtype, mode = case
        label = f"{op} {shape}{'' if dtype == 'float32' else ' ' + dtype} {mode}"
        lines.append((label, f"{best.provider} {ms(best.median_ms)}", parts))
    width = max((len(label) for label, _, _ in lines), default=0)
    ours = max((len(mine) for _, mine, _ in lines), default=0)
    return [f"{label:<{width}}  {mine:>{ours}} | " + " | ".join(parts) for label, mine, parts in lines]


def plot(rows: list[Row], out_path: Path, title: str) -> Path | None:
    """Bar chart of speed-up over eager per (shape, mode) and provider."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys((r.op, r.shape, r.dtype, r.mode, r.cuda_graph) for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        vals = []
        for case in cases:
            match = [r for r in rows if (r.op, r.shape, r.dtype, r.mode, r.cuda_graph) == case and r.provider == prov]
            vals.append(match[0].speedup_vs_eager or 0 if match else 0)
        ax.bar([c + i * width for c in range(len(cases))], vals, width, label=prov)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{o.split()[-1]}\n{s}\n{d} {m}" + ("\ngraph" if g else "") for o, s, d, m, g in cases],
                       fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("speed-up over eager PyTorch (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
