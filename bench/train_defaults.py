"""How ``pyvae train``'s defaults for the digits were chosen: on a validation split, not the test set.

The digits' training split (the 1438 images ``pyvae train`` trains on) is written to an ``.npz`` and
given to ``pyvae train --dataset``, which splits it again 80/20 (its fixed split): the models train on
1150 images and are scored on 288 validation images that the test set does not contain. Each row is
one ``pyvae train`` run of 100 epochs with the options shown on top of the model's defaults; the
table gives the validation negative ELBO (nats per image) and its improvement over the categorical
baseline fitted to the same 1150 images.

    python bench/train_defaults.py [--out bench/results/cpu/train/defaults.md] [--jobs 2]

Runs ``--jobs`` trainings at a time, one thread each (about 2 minutes in all on 2 cores).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import torch

import pyvae
from pyvae.data import load_dataset

# (model, extra options, what the row tests); the first row of each model is its default
CANDIDATES = [
    ("vae", [], "the defaults: ELU, latent 32, lr 2e-3, weight average 0.995, 10 mixtures"),
    ("vae", ["--activation", "relu", "--latent-dim", "16", "--lr", "1e-3", "--weight-ema", "0"],
     "the Bernoulli-era defaults (ReLU, latent 16, lr 1e-3, last weights)"),
    ("vae", ["--weight-ema", "0"], "the last weights instead of the average"),
    ("vae", ["--activation", "relu"], "ReLU"),
    ("vae", ["--latent-dim", "16"], "latent 16"),
    ("vae", ["--lr", "1e-3"], "lr 1e-3"),
    ("vae", ["--num-mix", "3"], "3 mixtures"),
    ("vae", ["--num-mix", "5"], "5 mixtures"),
    ("hvae", [], "the defaults: latent dims 16,8,4, KL warm-up 1000 steps, ELU, lr 2e-3, average 0.995, "
     "5 mixtures"),
    ("hvae", ["--num-mix", "10"], "10 mixtures"),
    ("hvae", ["--kl-warmup-steps", "250"], "KL warm-up 250 steps"),
    ("hvae", ["--kl-warmup-steps", "2000"], "KL warm-up 2000 steps"),
    ("hvae", ["--latent-dims", "32,16,8"], "latent dims 32,16,8"),
]


def run(dataset: str, out: str, model: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pyvae", "train", "--model", model, "--dataset", dataset, *extra, "--out", out,
           "--threads", "1", "--quiet", "--overwrite", "--iwae-k", "10"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "train", "defaults.md"))
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    digits = load_dataset("digits")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = os.path.join(tmp, "digits_train.npz")
        # uint8 0..16 would read as 0..16/255: store the levels as floats k/16 (read as 17 levels)
        np.savez(dataset, x=digits.x_train.numpy(), y=digits.y_train.numpy())
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run, dataset, os.path.join(tmp, f"run{i}"), model, extra)
                       for i, (model, extra, _) in enumerate(CANDIDATES)]
            results = [f.result() for f in futures]
    lines = [
        "# `pyvae train` defaults on the digits, chosen on a validation split",
        "",
        f"Command: `python bench/train_defaults.py` ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC; pyvae {pyvae.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs). The digits' training split (1438 images) split again 80/20 by `pyvae train`: "
        "1150 training and 288 validation images, none of them in the test set. 100 epochs, one thread per run, "
        f"{args.jobs} runs at a time; seed 0.",
        "",
        "| model | options on top of the defaults | what it tests | validation negative ELBO (nats) | "
        "below the categorical baseline |",
        "|---|---|---|---|---|",
    ]
    for (model, extra, what), m in zip(CANDIDATES, results):
        lines.append(f"| {model} | `{' '.join(extra) or '(none)'}` | {what} | {m['test_negative_elbo']:.3f} | "
                     f"{100 * m['relative_improvement']:.1f}% |")
    base = results[0]["baseline"]
    lines += ["", f"Categorical baseline on the validation images: {base['test_nll']:.3f} nats "
              f"({base['test_bits_per_dim']:.3f} bits/dim).", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
