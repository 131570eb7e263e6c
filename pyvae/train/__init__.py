"""``pyvae train``: the training CLI (see :mod:`pyvae.train.cli`)."""
from .cli import (UsageError, TrainingError, baseline_nll, batches, build_model, build_parser, evaluate, main,
                  parse_args, run_training)

__all__ = ["TrainingError", "UsageError", "baseline_nll", "batches", "build_model", "build_parser", "evaluate",
           "main", "parse_args", "run_training"]
