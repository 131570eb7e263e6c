"""``pyvae train``: train a VAE, ConvVAE, CVAE, VQ-VAE or hierarchical VAE from the command line
(``python -m pyvae train`` or the ``pyvae`` console script, which call :func:`main`).

One job a module; they use each other's public names only:

    cli.py          main (exit status 0, 1 or 2 with a one-line error), run_training and the order
                    of a run (train_and_report), the checks made before training, the summary line
    options.py      the parser, parse_args (per-model defaults and which options each model takes),
                    MODELS (--model name -> model class), choose_likelihood (from the data's
                    levels when --likelihood is not given) and build_model
    errors.py       UsageError (exit status 2) and TrainingError (exit status 1)
    distributed.py  Run (rank, device, output directory; barrier, sum, leave_together) and the
                    process group under torchrun (start_processes, stop_processes)
    checkpoint.py   atomic_write, save/load/restore of checkpoint.pt (model, unsaved buffers,
                    optimizer, random generators, history, weight average), the per-rank state hashes
    average.py      WeightAverage (--weight-ema): the averaged weights the evaluation uses
    loop.py         batches (the epoch's plan, shared by the ranks), the optimizer, train
    evaluate.py     heldout_losses (every epoch), baseline_nll (categorical_baseline for a discretized
                    likelihood), evaluate and report (metrics.json)
    plots.py        write_pictures: samples, reconstructions, loss curves, the latent's picture

The trainer knows a model by its name only in options.py's tables (defaults, options, the class to
build); everything else asks the model (:mod:`pyvae.models`): ``conditional``,
``continuous_latent``, ``fixed_kl``, ``evaluation_metrics``, ``prior_samples``, ``latent_traversal``.
"""
from .average import WeightAverage
from .checkpoint import CHECKPOINT, atomic_write, load_checkpoint, restore, save_checkpoint
from .cli import main, run_training, summary, train_and_report
from .distributed import Run, start_processes, stop_processes
from .errors import TrainingError, UsageError
from .evaluate import baseline_nll, categorical_baseline, evaluate, heldout_losses, report
from .loop import batches, train
from .options import MODELS, build_model, build_parser, choose_likelihood, parse_args
from .plots import write_pictures

__all__ = ["CHECKPOINT", "MODELS", "Run", "TrainingError", "UsageError", "WeightAverage", "atomic_write",
           "baseline_nll", "batches", "build_model", "build_parser", "categorical_baseline", "choose_likelihood", "evaluate", "heldout_losses", "load_checkpoint", "main", "parse_args",
           "report", "restore", "run_training", "save_checkpoint", "start_processes", "stop_processes", "summary",
           "train", "train_and_report", "write_pictures"]
