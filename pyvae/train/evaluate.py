"""Evaluation in ``pyvae train``: the held-out losses after every epoch (:func:`heldout_losses`, each
rank its share), the baseline that ignores the latent (:func:`baseline_nll`), the test-set numbers
(:func:`evaluate`: the model's own ``evaluation_metrics`` and the baseline) and ``metrics.json``
(:func:`report`: written as soon as the evaluation ends, then again with the pictures' names)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from .. import __version__, models
from ..data import ImageDataset
from ..metrics import evaluating, per_example
from ..ops.dmol import bits_per_dim
from .checkpoint import CHECKPOINT, atomic_write
from .distributed import Run
from .options import plain_args
from .plots import write_pictures

TRAIN_EXTRA = 'pip install "pyvae[train]"'  # the optional dependencies of the CLI (matplotlib, scikit-learn)


def heldout_losses(model: models.BaseVAE, data: ImageDataset, run: Run) -> dict[str, float]:
    """Mean test negative ELBO (and, for a model whose ELBO holds a fixed KL, e.g. a VQ-VAE's
    h*w*log K, the reconstruction NLL); each rank evaluates its share of the test set."""
    x, y = data.x_test.to(run.device), data.y_test.to(run.device) if model.conditional else None
    share = slice(run.rank, None, run.world)
    x, y = x[share], None if y is None else y[share]
    with evaluating(model):
        sums = [per_example(model.negative_elbo, x, y).double().sum()]
        if model.fixed_kl is not None:
            sums.append(per_example(lambda xb, yb: model(xb, yb).recon_loss, x, y).double().sum())
    sums = run.sum(torch.stack(sums + [torch.tensor(float(len(x)), dtype=torch.float64, device=run.device)]))
    return dict(zip(("test_negative_elbo", "test_recon_nll"), (sums[:-1] / sums[-1]).tolist()))


@torch.no_grad()
def baseline_nll(data: ImageDataset, likelihood: str) -> tuple[torch.Tensor, dict]:
    """Test NLL per example ``[N_test]`` of the best model that ignores the latent: independent
    pixels, each with the likelihood's distribution fitted to the training set by maximum likelihood
    (Bernoulli and continuous Bernoulli: on counts smoothed by half an observation, which keeps the
    probabilities off 0 and 1; Gaussian: with a variance floor; for the discretized likelihood
    ``"dmol"``, a categorical distribution over the data's levels, see :func:`categorical_baseline`)."""
    from .. import ops

    if likelihood == "dmol":
        return categorical_baseline(data)
    x, t = data.x_train.double(), data.x_test
    n = x.shape[0]
    mean = (x.sum(0) + 0.5) / (n + 1)
    if likelihood == "gaussian":
        # A pixel that never varies in training would get variance 0 (an infinite density); the
        # floor is the variance of a uniform quantisation step of 1/255 (8-bit images).
        var = x.var(0, correction=0).clamp_min(1 / 255 ** 2 / 12)
        mean = x.mean(0)
        nll = ops.gaussian_nll(mean.float().expand_as(t), t, var.log().float().expand_as(t), reduction="per_sample")
        return nll, {"distribution": "gaussian", "fit": "per-pixel mean and variance of the training set "
                     "(variance floor 1/(12*255^2))"}
    if likelihood == "bernoulli":
        logits = (mean.log() - (-mean).log1p()).float()
        nll = ops.bernoulli_nll(logits.expand_as(t), t, reduction="per_sample")
        return nll, {"distribution": "bernoulli",
                     "fit": "p = per-pixel mean of the training set, (sum + 0.5) / (N + 1)"}
    # continuous Bernoulli: an exponential family in its logit, so maximum likelihood matches its
    # mean to the data mean; the mean is increasing in the logit, found by bisection.
    from ..models.base import continuous_bernoulli_mean

    lo, hi = torch.full_like(mean, -1e4), torch.full_like(mean, 1e4)
    for _ in range(80):
        mid = (lo + hi) / 2
        below = continuous_bernoulli_mean(mid) < mean
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    logits = ((lo + hi) / 2).float()
    nll = ops.continuous_bernoulli_nll(logits.expand_as(t), t, reduction="per_sample")
    return nll, {"distribution": "continuous_bernoulli", "fit": "per-pixel maximum likelihood on the training set "
                 "(mean matched to (sum + 0.5) / (N + 1))"}


@torch.no_grad()
def categorical_baseline(data: ImageDataset) -> tuple[torch.Tensor, dict]:
    """Test NLL per example ``[N_test]`` of independent pixels, each value (every channel of every
    pixel) a categorical over the data's ``num_levels`` levels fitted to the training set with
    add-one smoothing, ``p_k = (count_k + 1) / (N + L)``: the discrete counterpart of the other
    baselines, in the same units as a discretized likelihood's negative ELBO."""
    levels = data.num_levels
    k_train = torch.round(data.x_train.double().flatten(1) * (levels - 1)).long()  # [N, D]
    k_test = torch.round(data.x_test.double().flatten(1) * (levels - 1)).long()
    counts = torch.zeros(k_train.shape[1], levels, dtype=torch.float64)
    counts.scatter_add_(1, k_train.T, torch.ones_like(k_train.T, dtype=torch.float64))
    log_p = ((counts + 1) / (len(k_train) + levels)).log()  # [D, L]
    nll = -log_p.gather(1, k_test.T).sum(0)
    return nll, {"distribution": "categorical", "levels": levels,
                 "fit": "per-pixel frequencies of each level in the training set, (count + 1) / (N + levels)"}


@torch.no_grad()
def evaluate(args: argparse.Namespace, run: Run, data: ImageDataset, model: models.BaseVAE) -> dict:
    """The test-set numbers of metrics.json (rank 0): the model's own (its ``evaluation_metrics``),
    with the baseline that ignores the latent after its test negative ELBO."""
    torch.manual_seed(args.seed)  # training is over: this only makes the metrics repeatable
    x = data.x_test.to(run.device)
    y = data.y_test.to(run.device) if model.conditional else None
    own = model.evaluation_metrics(x, y, x_train=data.x_train.to(run.device), iwae_k=args.iwae_k, seed=args.seed)
    base, base_info = baseline_nll(data, args.likelihood)
    model_nll, base_nll = own["test_negative_elbo"], float(base.double().mean())
    base_info["test_nll"] = base_nll
    if "test_bits_per_dim" in own:
        base_info["test_bits_per_dim"] = float(bits_per_dim(torch.tensor(base_nll, dtype=torch.float64),
                                                            math.prod(data.input_shape)))
    return {
        "test_negative_elbo": model_nll,
        "baseline": base_info,
        # > 0: the model's negative ELBO is that fraction of |baseline| below the baseline's NLL
        "relative_improvement": (base_nll - model_nll) / abs(base_nll) if base_nll else None,
        **own,
    }


def write_metrics(path: str, metrics: dict) -> None:
    """Writes ``metrics`` to ``path`` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))


def report(args: argparse.Namespace, run: Run, data: ImageDataset, model: models.BaseVAE, history: dict,
           resolved: dict, started: float) -> dict:
    """Evaluates the model and writes metrics.json, then the pictures (rank 0); returns the metrics.

    metrics.json is written as soon as the evaluation ends, so that the run's result is on disk
    whatever happens to the pictures; it is written again with their names. Pictures are optional:
    when they cannot be drawn, a warning says why and the run still succeeds."""
    train_seconds = history["train_seconds"]
    metrics = {
        "model": args.model, "dataset": data.name, "input_shape": list(data.input_shape),
        "n_train": len(data.x_train), "n_test": len(data.x_test),
        "parameters": sum(p.numel() for p in model.parameters()),
        **evaluate(args, run, data, model),
        "epochs": len(history["epochs"]), "steps": history["steps"], "train_seconds": train_seconds,
        "steps_per_second": history["steps"] / train_seconds if train_seconds else None,
        "pictures": [],
        "wall_seconds": time.perf_counter() - started,  # this invocation, evaluation and pictures included
        "device": str(run.device), "world_size": run.world, "backend": args.backend, "backends": resolved,
        "compile": args.compile, "torch_version": torch.__version__, "pyvae_version": __version__,
        "python_version": platform.python_version(),
        "args": plain_args(args),
    }
    path = os.path.join(args.out, "metrics.json")
    write_metrics(path, metrics)
    try:
        write_pictures(args, run, data, model, history, metrics, metrics["pictures"])
    except Exception as exc:  # noqa: BLE001 - any failure of an optional extra costs only the pictures
        if isinstance(exc, ImportError):
            why = f"{exc.name or 'matplotlib'} is not installed: {TRAIN_EXTRA}"
        else:
            why = f"{type(exc).__name__}: {' '.join(str(exc).split())}; they need matplotlib ({TRAIN_EXTRA})"
        metrics["pictures_skipped"] = f"no pictures ({why})"
        print(f"pyvae train: warning: {metrics['pictures_skipped']}; metrics.json and {CHECKPOINT} are complete",
              file=sys.stderr)
    metrics["wall_seconds"] = time.perf_counter() - started
    write_metrics(path, metrics)
    return metrics
