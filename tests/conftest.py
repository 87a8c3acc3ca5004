"""Shared test setup: the repository root on sys.path, paths, and the ``gpu`` and ``slow`` markers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device; skip them without one. Tests marked ``slow`` run
    only when asked for (``S2DSL_SLOW=1``, or a ``-m`` expression naming them): the default run
    keeps a fast representative of each (CI has 2 cores and 30 minutes)."""
    run_slow = os.environ.get("S2DSL_SLOW") == "1" or "slow" in (config.getoption("markexpr") or "")
    if not run_slow:
        skip_slow = pytest.mark.skip(reason="slow: set S2DSL_SLOW=1 (or -m slow) to run it")
        for item in items:
            if item.get_closest_marker("slow") is not None:
                item.add_marker(skip_slow)
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture
def cli_env() -> dict:
    """Environment for running ``python -m s2dsl`` in a subprocess from any directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    return env
