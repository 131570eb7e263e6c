"""``pyvae train``: train a VAE, ConvVAE, CVAE, VQ-VAE or hierarchical VAE from the command line.

A plain loop (as pytorch/examples' VAE is): Adam(W) over shuffled mini-batches with a tqdm bar,
a checkpoint after every epoch (written to a temporary file in the same directory and renamed, so
a killed run leaves the previous checkpoint intact; it holds everything the next step reads, so a
resumed run equals the uninterrupted one), then ``metrics.json`` in ``--out`` as soon as the
evaluation ends, and after it PNG pictures (optional: when they cannot be drawn, e.g. without
matplotlib, the run warns and still succeeds). Under ``torchrun --nproc_per_node=N`` the same
command trains with DistributedDataParallel: every global batch of ``--batch-size`` examples is
split between the ranks, and rank 0 writes the outputs.

Exit status: 0 on success, 2 for a usage error (bad option, missing or malformed dataset, a dataset
too small to evaluate, missing scikit-learn for the digits, an --out that cannot be written, missing,
incompatible or incomplete checkpoint: one line on stderr, no traceback, checked before training),
1 when training diverges.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

from .. import backends, registry
from ..data import DatasetError, ImageDataset, load_dataset, test_count
from .average import maybe_applied
from .checkpoint import CHECKPOINT, resume_state, write_rank_state
from .distributed import Run, start_processes, stop_processes
from .errors import TrainingError, UsageError
from .evaluate import report
from .loop import train
from .options import MODELS, build_model, parse_args


def check_backend(args: argparse.Namespace, device: torch.device) -> dict[str, str]:
    """The backend each op family resolves to here; UsageError if --backend cannot serve the device."""
    try:
        return {op: backends.resolve(args.backend, device, op) for op in registry.NAMES}
    except ValueError as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from None


def run_training(args: argparse.Namespace, log: Callable[[str], None] = print) -> Optional[dict]:
    """Everything ``pyvae train`` does, for parsed options; returns the metrics (rank 0) or None."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    run = None
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        run = start_processes(args)
        return train_and_report(args, run, started, log)
    finally:
        torch.set_num_threads(threads)  # main() may be called in a process that goes on (tests, notebooks)
        stop_processes(run)


def train_and_report(args: argparse.Namespace, run: Run, started: float,
                     log: Callable[[str], None]) -> Optional[dict]:
    """Loads the data, builds the model (resuming with ``--resume``), trains it, and on rank 0
    evaluates it and writes metrics.json and the pictures; returns the metrics (rank 0) or None.
    Every check that can refuse the run (UsageError) comes before training."""
    resolved = check_backend(args, run.device)
    try:
        data = load_dataset(args.dataset, binarize=args.binarize)
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    check_dataset_size(args, run, data)
    torch.manual_seed(args.seed)
    model = build_model(args, data).to(run.device)
    state = resume_state(args, run.device)
    if run.main:
        prepare_out(args.out)
    run.barrier()  # the directory exists before any rank writes into it
    history, average = train(args, run, data, model, state, log)
    if args.debug_rank_state:
        write_rank_state(run, model, average)
    with maybe_applied(average, model):
        metrics = report(args, run, data, model, history, resolved, started) if run.main else None
    run.leave_together()  # after rank 0's evaluation and pictures
    return metrics


def check_dataset_size(args: argparse.Namespace, run: Run, data: ImageDataset) -> None:
    """Refuses up front (UsageError) a dataset too small to train on or to evaluate."""
    if len(data.x_train) < run.world:
        raise UsageError(f"dataset {data.name}: its training split has {len(data.x_train)} image(s), fewer than "
                         f"the {run.world} processes, and every process needs at least one")
    if MODELS[args.model].continuous_latent and len(data.x_test) < 2:
        smallest = next(n for n in itertools.count(2) if test_count(n) >= 2)
        raise UsageError(f"dataset {data.name}: its test split has {len(data.x_test)} image, and the evaluation of "
                         f"--model {args.model} needs at least 2 (active units are a variance over the test images): "
                         f"give it at least {smallest} images")


def prepare_out(out: str) -> None:
    """Creates ``out`` and writes (and removes) a file in it, so that a directory the run could not
    write into is refused (UsageError) before training rather than at the first checkpoint."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    # A real file rather than os.access: it is what the run will do, and sees what os.access does
    # not (ACLs, network filesystems' own checks).
    try:
        fd, probe = tempfile.mkstemp(prefix=".pyvae-write-test-", dir=out)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write into the directory ({exc.strerror})") from None
    os.close(fd)
    os.remove(probe)


def summary(m: dict) -> str:
    """The one line ``pyvae train`` prints about a finished run's metrics."""
    change = m["relative_improvement"]
    line = (f"test negative ELBO {m['test_negative_elbo']:.3f} nats, {100 * abs(change):.1f}% "
            f"{'below' if change >= 0 else 'above'} the independent-pixel baseline's {m['baseline']['test_nll']:.3f}")
    if "test_bits_per_dim" in m:
        line += f" ({m['test_bits_per_dim']:.3f} vs {m['baseline']['test_bits_per_dim']:.3f} bits/dim)"
    if "active_units" in m:
        line += f"; iwae_nll {m[next(k for k in m if k.startswith('iwae_nll'))]:.3f}; " \
                f"active units {m['active_units']}/{m['latent_dim']}"
    else:
        line += f" (reconstruction NLL {m['test_recon_nll']:.3f})"
        if m.get("num_quantizers", 1) > 1:
            line += "; codes used per stage " + ", ".join(f"{u}/{m['num_codes']}" for u in m["codes_used"]) \
                + ", perplexity per stage " + ", ".join(f"{p:.1f}" for p in m["perplexity"])
        else:
            line += f"; codes used {m['codes_used']}/{m['num_codes']}, perplexity {m['perplexity']:.1f}"
    return line + f"; {m['steps']} steps in {m['train_seconds']:.1f} s ({m['steps_per_second']:.1f}/s)"


def main(argv: Optional[list[str]] = None) -> int:
    """``pyvae train ...``; returns the exit status (2 for usage errors, 1 if training diverged)."""
    from tqdm import tqdm

    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        metrics = run_training(args, log=tqdm.write)
    except UsageError as exc:
        print(f"pyvae train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"pyvae train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyvae train: interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
    if metrics is not None:
        print(f"wrote {args.out}: {', '.join(['metrics.json', *metrics['pictures'], CHECKPOINT])}")
        print(summary(metrics))
    return 0
