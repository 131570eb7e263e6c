"""One rank of tests/test_vq_layer.py::test_ema_codebook_is_synchronised_under_ddp (not a pytest
module): for each case, trains a DDP-wrapped EMA VectorQuantizer (or ResidualVQ) for a few steps on
this rank's share of a fixed batch and saves its EMA state. The test imports CASES, make_case and shard to
run the same cases in one process on the concatenated batch."""
import faulthandler
import os
import sys

import torch
import torch.distributed as dist

import pyvae

STEPS = 4
# name -> VectorQuantizer options (pyvae.nn.ResidualVQ's with "residual"); "uneven" shards give the
# ranks different row counts
CASES = {
    "ema": dict(num_codes=6, ema_decay=0.8),
    # more codes than clusters and a high threshold: codes are restarted at every step
    "restarts": dict(num_codes=12, ema_decay=0.8, dead_code_threshold=8.0, kmeans_init=True, kmeans_iters=3,
                     uneven=True),
    "restarts_cosine": dict(num_codes=12, ema_decay=0.8, dead_code_threshold=8.0, kmeans_init=True,
                            kmeans_iters=3, cosine=True, uneven=True),
    # every stage's statistics from the fused search, k-means per stage, restarts at stage residuals
    "residual": dict(residual=True, num_quantizers=3, codebook_size=8, decay=0.8, threshold_ema_dead_code=14.0,
                     kmeans_init=True, kmeans_iters=3, uneven=True),
}


def ema_layers(layer) -> list:
    """The VectorQuantizers of a case's layer."""
    if isinstance(layer, pyvae.nn.ResidualVQ):
        return [stage._codebook for stage in layer.layers]
    return [layer]


def make_case(name: str, world: int = 2):
    """(data [world * 64, 4], encoder, layer), the same in every process."""
    options = dict(CASES[name])
    options.pop("uneven", None)
    residual = options.pop("residual", False)
    torch.manual_seed(0)
    data = torch.randn(world * 64, 4) + torch.randint(0, 3, (world * 64, 1)) * 3.0
    encoder = torch.nn.Linear(4, 4)
    if residual:
        layer = pyvae.nn.ResidualVQ(dim=4, **options)
    else:
        layer = pyvae.nn.VectorQuantizer(dim=4, backend="cpu", **options)
    return data, encoder, layer


def shard(name: str, data: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows; their concatenation over the ranks, in rank order, is what one process sees."""
    if CASES[name].get("uneven"):
        bounds = [0, 70, data.shape[0]] if world == 2 else [data.shape[0] * r // world for r in range(world + 1)]
        return data[bounds[rank]:bounds[rank + 1]]
    return data[rank::world]


def train(name: str, rank: int, world: int) -> dict:
    data, encoder, layer = make_case(name, world)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(encoder, layer))
    for _ in range(STEPS):  # no optimizer step: the encoder stays as initialised
        r = model(shard(name, data, rank, world))
        (r.loss if isinstance(r, pyvae.ops.VQResult) else r[2].sum()).backward()
    return {key: t.clone() for key, t in layer.state_dict().items()}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(60, exit=True)  # a hang shows up in the log, not as a timeout
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # DDP is gone (train returned) before the process group: the other order can hang at exit
    states = {name: train(name, rank, world) for name in CASES}
    torch.save(states, os.path.join(out_dir, f"state{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
