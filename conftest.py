"""Run tests and benchmarks against the installed pyvae, never the source folder of the same name
(which has neither the built extension nor pyvae.kernels): drop the repository root that
`python -m pytest` and pytest's rootdir handling put on sys.path."""
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.modules.pop("pyvae", None)
