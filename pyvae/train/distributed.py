"""Where this process stands in a ``pyvae train`` job: its :class:`Run` (rank, device, output
directory), the process group that torchrun's environment describes (:func:`start_processes`,
:func:`stop_processes`), and the collectives the trainer uses through the Run, which are no-ops in a
single process."""
from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import UsageError

END_WAIT = datetime.timedelta(days=1)  # how long the other ranks wait for rank 0's evaluation and pictures


@dataclass
class Run:
    """Where this process stands: its rank in the job, the device, the output directory, and (when
    distributed) the group in which the ranks wait for each other at the end (see
    :meth:`leave_together`)."""
    rank: int
    world: int
    device: torch.device
    out: str
    end_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Waits until every rank is here."""
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def leave_together(self) -> None:
        """Waits, however long rank 0's evaluation and pictures take, until every rank is here.

        A rank that went straight from its last collective to the interpreter's exit was now and
        then aborted there ("terminate called without an active exception", and torchrun then
        stopped rank 0 too): the process group outlives destroy_process_group, and a gloo worker
        thread that had not yet released that collective's tensors needed the GIL during
        finalization. Waiting here, with the GIL released, gives it that time."""
        if self.distributed:
            dist.barrier(group=self.end_group)


def choose_device(requested: Optional[str], local_rank: int) -> torch.device:
    """The device of ``--device`` (default: cuda if available, else cpu), the ``local_rank``-th GPU
    for cuda; UsageError where it is not there."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"--device cuda: CUDA is not available here ({why}); use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_processes(args: argparse.Namespace) -> Run:
    """This process's Run; joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise UsageError(f"malformed torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {exc}") from None
    device = choose_device(args.device, local_rank if world > 1 else 0)
    if world > 1:
        if args.batch_size < world:
            raise UsageError(f"--batch-size {args.batch_size} is smaller than the number of processes ({world}): "
                             "every rank needs a share of each batch")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except ValueError as exc:  # a missing MASTER_ADDR / MASTER_PORT and the like
            raise UsageError(f"WORLD_SIZE={world} but torch.distributed cannot start: {exc}") from None
        # The other ranks wait there while rank 0 evaluates and draws, however long that takes: a
        # gloo group of its own, whose timeout is not the training collectives' (NCCL's watchdog
        # would end a wait of more than 10 minutes, gloo's default 30, and the run with it).
        return Run(rank, world, device, args.out, dist.new_group(backend="gloo", timeout=END_WAIT))
    return Run(rank, world, device, args.out)


def stop_processes(run: Optional[Run]) -> None:
    """Leaves the process group that :func:`start_processes` joined (nothing in a single process)."""
    if run is not None and run.distributed and dist.is_initialized():
        dist.destroy_process_group()
