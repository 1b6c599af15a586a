"""A pytest plugin that routes clairstat's Holm adjustment back to statsmodels.

For timing the test suite as it ran before the package computed Holm's adjustment
itself (``benchmarks/RESULTS.md``, the Holm section), with the collections statsmodels
runs counted and timed:

    PYTHONPATH=benchmarks python -m pytest -p holm_statsmodels_plugin \\
        tests/test_invariants.py --durations=3
"""

import gc
import sys
import time

from statsmodels.stats.multitest import multipletests

import clairstat._inference as _inference

_collect = gc.collect
_spent = [0, 0.0]


def _statsmodels_adjust(p_values, level, correction):
    return multipletests(p_values, alpha=level, method=correction)[1]


def _timed_collect(*args):
    start = time.perf_counter()
    result = _collect(*args)
    _spent[0] += 1
    _spent[1] += time.perf_counter() - start
    return result


_inference.adjust_p_values = _statsmodels_adjust
gc.collect = _timed_collect


def pytest_sessionfinish(session):
    print(f"\nholm_statsmodels_plugin: {_spent[0]} gc.collect calls, {_spent[1]:.1f} s in "
          f"them", file=sys.stderr)
