"""One rank of tests/test_vq.py::test_ema_codebook_is_synchronised_under_ddp (not a pytest module):
trains a DDP-wrapped EMA VectorQuantizer for a few steps on this rank's share of a fixed batch and
saves its codebook."""
import faulthandler
import os
import sys

import torch
import torch.distributed as dist

import pyvae


def train(rank: int, world: int) -> torch.Tensor:
    torch.manual_seed(0)
    data = torch.randn(world * 64, 4) + torch.randint(0, 3, (world * 64, 1)) * 3.0  # the same everywhere
    encoder = torch.nn.Linear(4, 4)
    layer = pyvae.nn.VectorQuantizer(6, 4, ema_decay=0.8, backend="cpu")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(encoder, layer))
    for _ in range(3):  # no optimizer step: the encoder stays as initialised
        r = model(data[rank::world])
        r.loss.backward()
    return layer.codebook.clone()


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(60, exit=True)  # a hang shows up in the log, not as a timeout
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # DDP is gone (train returned) before the process group: the other order can hang at exit
    codebook = train(rank, world)
    torch.save(codebook, os.path.join(out_dir, f"codebook{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
