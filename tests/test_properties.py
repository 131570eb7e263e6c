"""Property-based tests (hypothesis) of every op family on every backend this machine has: random
shapes (0, 1, odd, larger than every block), layouts (strided, expanded, transposed), dtypes and
values (±inf, NaN, huge, tiny), each against the float64 reference with the tolerances of
tests/tolerances.py and the README's NaN/Inf rules. Example counts are bounded and derandomized, so
CI runs the same cases every time; the Triton interpreter gets few, small ones.

The cases are each family's (``families.<name>.property_case``, found through pyvae.registry);
this file runs them."""
from __future__ import annotations

import importlib

import pytest

from pyvae import backends, registry

from cases import PAIRS, interpreted, pair_id

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Draw:
    """The draws a property case makes (see families/__init__.py), from hypothesis's ``data``."""

    def __init__(self, data):
        self._data = data

    def sample(self, options, label: str):
        return self._data.draw(st.sampled_from(options), label=label)

    def sample_list(self, options, label: str, *, min_size: int = 0, max_size: int):
        return self._data.draw(st.lists(st.sampled_from(options), min_size=min_size, max_size=max_size), label=label)

    def integers(self, low: int, high: int, label: str) -> int:
        return self._data.draw(st.integers(low, high), label=label)

    def boolean(self, label: str) -> bool:
        return self._data.draw(st.booleans(), label=label)


def run_examples(pair, body, native: int, triton: int) -> None:
    """Runs ``body(pair, draw)`` on ``native`` hypothesis examples (``triton`` under the interpreter)."""
    @settings(max_examples=triton if interpreted(pair) else native, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def examples(data):
        body(pair, Draw(data))

    examples()


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("family", registry.FAMILIES, ids=registry.NAMES)
def test_properties(family, pair):
    device, backend = pair
    if backend not in backends.available(device, family.name):
        pytest.skip(f"backend {backend!r} is off for {family.name} on {device}")
    cases = importlib.import_module(family.cases)
    native, triton = cases.PROPERTY_EXAMPLES
    run_examples(pair, cases.property_case, native=native, triton=triton)
