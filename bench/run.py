"""Run pyvae's benchmark suite on this machine's default device and write the results.

    python bench/run.py                 # the headline cases of every op family (about 10 minutes on 2 CPU cores)
    python bench/run.py --full          # the whole sweep: what bench/results/<device>/ holds
    python bench/run.py --ops vq --device cpu

The default (headline) run times, per family, the shapes the README's Performance table quotes
(reparameterize + KL 4096x1024 with and without a prior, the likelihoods at 4096x4096, nearest_code
and vector_quantize at N=16384 K=1024 D=64 on a CPU, one training step per model); on a CPU each
provider gets about CPU_TIME_BUDGET_S seconds of timed runs (at least harness.MIN_CPU_REPS), so
the slow eager baselines run a few times, not fifteen. ``--full`` adds the sweep's other shapes
with the fixed repetition counts. ``--quick`` is the default run (kept for old command lines).

Where the files go: ``--full`` writes bench/results/<device>/<op>.csv (one row per provider x shape
x mode, with device, versions, date and this command), <op>.md (the table) and <op>.png (speed-up
plot); the default run writes the same files to bench/results/<device>/headline/, so it never
replaces the committed full results; ``--out DIR`` writes to DIR in either mode. The run ends with
one summary line per op and mode and the folder it wrote.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path

import torch

import harness
import posterior
import train_step
from pyvae.registry import FAMILIES

# Each op family's bench/<name>.py (in registration order), then whole training steps.
SUITES = {**{f.name: importlib.import_module(f.bench) for f in FAMILIES}, "train_step": train_step,
          "posterior": posterior}
CPU_TIME_BUDGET_S = 1.0


def results_dir(device: str, full: bool, out: Path | None = None) -> Path:
    """``out`` if given; else bench/results/<device>/ for the full sweep and its headline/ folder for
    the default run, so that a default run never replaces the committed full results."""
    if out is not None:
        return out
    base = harness.RESULTS / harness.device_slug(device)
    return base if full else base / "headline"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", default=list(SUITES), choices=list(SUITES))
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--full", action="store_true", help="the whole sweep (what bench/results/<device>/ holds)")
    sweep.add_argument("--quick", action="store_true", help="the default headline run (kept for old command lines)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results/<device>, or its headline/ without --full)")
    args = parser.parse_args(argv)
    args_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = os.environ.get("PYVAE_BENCH_COMMAND") or f"python bench/run.py {args_text}".strip()
    # pyvae's own settings change what is measured: record them as part of the command
    settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                        if k.startswith("PYVAE_") and k != "PYVAE_BENCH_COMMAND")
    command = f"{settings} {command}".strip()
    env = harness.environment(args.device)
    out_dir = results_dir(args.device, args.full, args.out)
    harness.CPU_TIME_BUDGET_S = None if args.full else CPU_TIME_BUDGET_S
    print(f"pyvae benchmarks on {env['device_name']} ({args.device}); torch {env['torch']}, "
          f"triton {env['triton']}; {'full sweep' if args.full else 'headline cases (--full for the sweep)'}")
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    all_rows = []
    for op in args.ops:
        suite = SUITES[op]
        total = suite.n_cases(args.device, args.full)
        bar = tqdm(total=total, desc=op, unit="case") if tqdm else None
        rows = suite.run(args.device, full=args.full, progress=bar)
        if bar:
            bar.close()
        harness.write_results(rows, env, out_dir, op, command)
        harness.plot(rows, out_dir / f"{op}.png", f"{op} on {env['device_name']}")
        if args.full:
            print(harness.markdown_table(rows, env, command))
        all_rows += rows
    print("\nSummary: the fastest pyvae backend against the others (speed-up x, median ms); peak memory of one call")
    for line in harness.summary(all_rows):
        print("  " + line)
    print(f"Results ({', '.join(args.ops)}: .csv, .md tables with every provider, .png) in {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
