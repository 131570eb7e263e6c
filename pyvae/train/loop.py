"""The training loop of ``pyvae train``: Adam(W) over shuffled mini-batches (:func:`batches`, the
same plan on every rank, each training on its shard) with a tqdm bar, the held-out loss and a
checkpoint after every epoch, DistributedDataParallel across ranks, optionally torch.compile and a
weight average (``--weight-ema``, :mod:`pyvae.train.average`)."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import torch

from .. import models
from ..data import ImageDataset
from .average import WeightAverage, maybe_applied
from .checkpoint import restore, save_checkpoint
from .distributed import Run
from .errors import TrainingError
from .evaluate import heldout_losses


def batches(n: int, batch_size: int, epoch: int, seed: int, world: int) -> list[torch.Tensor]:
    """The global batches of one epoch: a permutation of ``range(n)`` seeded by (seed, epoch), the
    same on every rank, cut into ``batch_size`` pieces; a last piece smaller than ``world`` (one
    example per rank) is dropped. Rank r trains on ``batch.tensor_split(world)[r]``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    out = list(order.split(batch_size))
    if out and len(out[-1]) < world:
        out.pop()
    return out


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam, or AdamW with ``--weight-decay``: weight decay on the layers' weight matrices and
    kernels only, not on biases, a learned likelihood variance or a learned codebook."""
    decay = [p for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() > 1]
    chosen = set(map(id, decay))
    rest = [p for p in model.parameters() if id(p) not in chosen]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr) if args.weight_decay else torch.optim.Adam(groups, lr=args.lr)


def training_module(args: argparse.Namespace, run: Run, model: torch.nn.Module) -> Callable:
    """What the loop calls forward on: the model, in DistributedDataParallel across ranks, compiled
    with ``--compile``."""
    train_model = model
    if run.distributed:
        # The ranks' buffers (EMA codebooks, schedules) are kept equal by the layers themselves (the
        # quantizer all-reduces its statistics); not broadcasting them before every forward saves
        # that traffic and lets the multi-process test check that they stay equal.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None, forward_sync_buffers=False)
    if args.compile:
        train_model = torch.compile(train_model)
    return train_model


def train(args: argparse.Namespace, run: Run, data: ImageDataset, model: models.BaseVAE, state: Optional[dict],
          log: Callable[[str], None]) -> tuple[dict, Optional[WeightAverage]]:
    """Trains up to ``args.epochs``; a checkpoint after every epoch. Returns the final history and,
    with ``--weight-ema``, the weight average (the held-out losses are the average's)."""
    from tqdm import tqdm

    optimizer = make_optimizer(args, model)
    average = WeightAverage(model, args.weight_ema) if args.weight_ema else None
    history: dict[str, Any] = {"step_loss": [], "epochs": [], "train_seconds": 0.0}
    epoch = step = 0
    if state is not None:
        epoch, step, history = restore(state, model, optimizer, run, average)
    train_model = training_module(args, run, model)
    x_all = data.x_train.to(run.device)
    y_all = data.y_train.to(run.device) if model.conditional else None
    model.train()
    while epoch < args.epochs:
        epoch_start = time.perf_counter()
        plan = batches(len(x_all), args.batch_size, epoch, args.seed, run.world)
        losses = []
        bar = tqdm(plan, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
                   disable=args.quiet or not run.main, file=sys.stderr)
        for i, global_batch in enumerate(bar):
            # contiguous shards: the ranks' rows in rank order are the global batch, the order in
            # which the quantizer's dead-code restarts number the rows of all ranks
            shard = global_batch.tensor_split(run.world)[run.rank].to(run.device)
            x = x_all[shard]
            out = train_model(x) if y_all is None else train_model(x, y_all[shard])
            loss = out.loss
            if run.distributed:
                # DDP averages the ranks' gradients; weighting each rank's mean by its share of the
                # batch makes that the gradient of the mean over the whole global batch.
                loss = loss * (len(shard) * run.world / len(global_batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update(model)
            losses.append(loss.detach() / run.world)
            step += 1
            if step == args.debug_stop_at_step:
                os.kill(os.getpid(), signal.SIGSTOP)  # the resume test SIGKILLs the process here
            if i % 10 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{float(losses[-1]) * run.world:.3f}")
        bar.close()
        step_loss = torch.stack(losses).double() if losses else torch.zeros(0, dtype=torch.float64)
        step_loss = run.sum(step_loss).tolist()
        train_seconds = time.perf_counter() - epoch_start
        with maybe_applied(average, model):
            test = heldout_losses(model, data, run)
        epoch += 1
        if not all(math.isfinite(v) for v in [*step_loss, *test.values()]):
            last = step_loss[-1] if step_loss else "-"
            raise TrainingError(f"training diverged in epoch {epoch} (train loss {last}, test "
                                f"{test['test_negative_elbo']}); the last good checkpoint is kept. Try a smaller --lr")
        history["step_loss"] += step_loss
        history["epochs"].append({"epoch": epoch, "step": step, "train_loss": sum(step_loss) / max(len(step_loss), 1),
                                  **test, "seconds": train_seconds})
        history["train_seconds"] += train_seconds
        if run.main:
            save_checkpoint(args, run, model, optimizer, epoch, step, history, average)
            if not args.quiet:
                recon = f"  test recon NLL {test['test_recon_nll']:.3f}" if "test_recon_nll" in test else ""
                log(f"epoch {epoch}/{args.epochs}  train loss {history['epochs'][-1]['train_loss']:.3f}  "
                    f"test negative ELBO {test['test_negative_elbo']:.3f}{recon} nats  ({train_seconds:.1f} s)")
    history["steps"] = step
    return history, average
