"""Sweeps the block sizes of the Triton nearest-code search on this GPU (run by bench/gpu_check.sh vq).

    python bench/tune_vq_triton.py [--out vq_tune.md] [--quick]

For each problem in PROBLEMS and each precision, times every configuration of
(BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages) in the grid below with triton.testing.do_bench,
checks that it returns the same codes as the current default (kernels.vq.search_config), and writes
the best ones with TFLOP/s (2 N K D / t) and % of the dense tensor-core peak. Configurations that do
not fit (shared memory, registers) are reported as such. Use the winner in search_config, or try
one with PYVAE_VQ_TRITON_CONFIG="BLOCK_N,BLOCK_K,BLOCK_D,warps,stages".
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing
from tqdm import tqdm

from harness import environment, tensor_core_peak_tflops
from pyvae.kernels.vq import SearchConfig, launch_search, search_config

PROBLEMS = [(65536, 16384, 256), (16384, 4096, 256)]
CASES = [("exact", torch.float32), ("fast", torch.float32), ("fast", torch.bfloat16)]


def grid(dtype: torch.dtype, quick: bool) -> list[SearchConfig]:
    block_ds = (32, 64) if dtype == torch.float32 else (64, 128)
    warps_stages = ((4, 3), (8, 3), (8, 4)) if not quick else ((8, 3),)
    return [SearchConfig(bn, bk, bd, w, s) for bn, bk, bd, (w, s)
            in itertools.product((64, 128), (64, 128, 256), block_ds, warps_stages)]


def run(quick: bool) -> list[str]:
    device = "cuda"
    lines = []
    problems = PROBLEMS[1:] if quick else PROBLEMS
    total = sum(len(grid(dtype, quick)) for _ in problems for _, dtype in CASES)
    bar = tqdm(total=total, desc="vq configs", unit="config", file=sys.stderr)
    for (n, k, d), (precision, dtype) in itertools.product(problems, CASES):
        torch.manual_seed(0)
        x = torch.randn(n, d, device=device).to(dtype)
        e = torch.randn(k, d, device=device).to(dtype)
        exact = precision == "exact"
        idx = torch.empty(n, dtype=torch.int64, device=device)
        dist = torch.empty(n, dtype=torch.float32, device=device)
        default = search_config(d)
        launch_search(x, e, exact, idx, dist, default)
        reference = idx.clone()
        peak = tensor_core_peak_tflops(device, dtype)
        results = []
        for config in grid(dtype, quick):
            try:
                launch_search(x, e, exact, idx, dist, config)
                torch.cuda.synchronize()
                agree = (idx == reference).float().mean().item()
                ms = triton.testing.do_bench(lambda: launch_search(x, e, exact, idx, dist, config), warmup=10, rep=50)
                results.append((ms, config, agree))
            except Exception as err:  # out of resources and the like: this config does not fit
                results.append((float("inf"), config, f"{type(err).__name__}"))
            bar.update(1)
        results.sort(key=lambda r: r[0])
        default_ms = next((ms for ms, c, _ in results if c == default), float("nan"))
        lines += [f"\n### N={n} K={k} D={d} {str(dtype).removeprefix('torch.')} precision={precision}\n",
                  f"default {tuple(default)}: {default_ms:.3f} ms\n",
                  "| BLOCK_N, BLOCK_K, BLOCK_D, warps, stages | ms | TFLOP/s | % peak | same codes as default |",
                  "|---|---|---|---|---|"]
        for ms, config, agree in results[:8]:
            tflops = 2 * n * k * d / (ms * 1e-3) / 1e12 if ms != float("inf") else 0.0
            pct = f"{100 * tflops / peak:.0f}%" if peak and ms != float("inf") else ""
            agree_s = f"{100 * agree:.3f}%" if isinstance(agree, float) else agree
            lines.append(f"| {tuple(config)} | {ms:.3f} | {tflops:.1f} | {pct} | {agree_s} |")
    bar.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    parser.add_argument("--quick", action="store_true", help="one problem, fewer warps/stages")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_vq_triton.py needs a CUDA device")
    env = environment("cuda")
    t0 = time.time()
    body = run(args.quick)
    header = [f"# Triton nearest-code search: block-size sweep on {env['device_name']}",
              f"`python bench/tune_vq_triton.py{' --quick' if args.quick else ''}`; torch {env['torch']}, "
              f"triton {env['triton']}, commit {env['commit']}, {env['date']}, {time.time() - t0:.0f} s. "
              "Best 8 per case (do_bench medians)."]
    text = "\n".join(header + body) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
