"""Chaos suite selection.

``make chaos`` (``pytest -q -s tests/chaos``) runs the full variant (marker ``chaos``);
``LOGPIPE_CHAOS_SCALE=ci`` runs the CI-sized one (marker ``chaos_ci``) instead, also from a plain
``pytest tests`` run. Without either (``make test`` collects every directory), the suite is
skipped: the full run takes a quarter of an hour and is not part of ``make test``. An explicit
``-m chaos_ci`` / ``-m chaos`` is honoured as given.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: the full chaos run (200k logs, 20 kills, 60 s ES "
                                       "outage, broker restart, rebalances, poison)")
    config.addinivalue_line("markers", "chaos_ci: the CI-sized chaos run (30k logs, 5 kills, "
                                       "20 s ES outage)")


def _targets_this_dir(config: pytest.Config) -> bool:
    for arg in config.args:
        path = Path(arg.split("::", 1)[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    scale = os.environ.get("LOGPIPE_CHAOS_SCALE", "").strip().lower()
    markexpr = (config.option.markexpr or "").strip()
    if scale and scale not in ("ci", "full"):
        raise pytest.UsageError(f"LOGPIPE_CHAOS_SCALE={scale!r}: use ci or full")
    if not scale and "chaos" in markexpr:
        return  # the marker expression picks
    wanted = scale or ("full" if _targets_this_dir(config) else "")
    for item in items:
        if _HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item_scale = "ci" if item.get_closest_marker("chaos_ci") else "full"
        if not wanted:
            item.add_marker(pytest.mark.skip(
                reason="chaos suite: `make chaos` (full) or LOGPIPE_CHAOS_SCALE=ci"))
        elif item_scale != wanted:
            item.add_marker(pytest.mark.skip(reason=f"LOGPIPE_CHAOS_SCALE selects {wanted}"))
