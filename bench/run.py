"""Run pyvae's benchmark suite on this machine's default device and write the results.

    python bench/run.py                 # every op family, default device (cuda if present, else cpu)
    python bench/run.py --device cpu --quick

Writes bench/results/<device>/<op>.csv (one row per provider x shape x mode, with device,
versions, date and this command), <op>.md (the table printed here) and <op>.png (speed-up plot).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

import harness
import likelihood
import reparam_kl
import train_step
import vq

SUITES = {"reparam_kl": reparam_kl, "likelihood": likelihood, "vq": vq, "train_step": train_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>)")
    args = parser.parse_args(argv)
    args_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = os.environ.get("PYVAE_BENCH_COMMAND") or f"python bench/run.py {args_text}".strip()
    # pyvae's own settings change what is measured: record them as part of the command
    settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                        if k.startswith("PYVAE_") and k != "PYVAE_BENCH_COMMAND")
    command = f"{settings} {command}".strip()
    env = harness.environment(args.device)
    out_dir = args.out or harness.RESULTS / harness.device_slug(args.device)
    print(f"pyvae benchmarks on {env['device_name']} ({args.device}); torch {env['torch']}, triton {env['triton']}")
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    for op in args.ops:
        suite = SUITES[op]
        total = suite.n_cases(args.device, args.quick)
        bar = tqdm(total=total, desc=op, unit="case") if tqdm else None
        rows = suite.run(args.device, quick=args.quick, progress=bar)
        if bar:
            bar.close()
        files = harness.write_results(rows, env, out_dir, op, command)
        png = harness.plot(rows, out_dir / f"{op}.png", f"{op} on {env['device_name']}")
        print(harness.markdown_table(rows, env, command))
        print("wrote", ", ".join(str(p) for p in files + ([png] if png else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
