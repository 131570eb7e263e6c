"""The two failures ``pyvae train`` reports in one line (see :func:`pyvae.train.cli.main`)."""


class UsageError(Exception):
    """A problem with the command line or what it names (dataset, checkpoint, device): the CLI
    prints the message on one line and exits with status 2."""


class TrainingError(Exception):
    """Training failed in a way the user can act on (e.g. the loss diverged): exit status 1."""
