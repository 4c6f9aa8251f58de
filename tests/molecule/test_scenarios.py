"""Run each Molecule scenario (create -> converge -> idempotence -> verify -> destroy) for real.

Scenarios live in molecule/<name>/. `make test` runs one scenario per role; the one marked
`full` (the whole pipeline on seven hosts) runs in `make test-full` and `make test-pipeline`, and
in CI after `make test` when the 90-minute budget still has room. Output goes to
.cache/logs/molecule-<name>.log; a failure shows its tail.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
LOGS = TOP / ".cache" / "logs"

# Order matters only for speed (cheap scenarios first); each scenario is self-contained.
SCENARIOS = ["common", "pki", "kafka", "elasticsearch", "logpipe"]
FULL_SCENARIOS = ["pipeline"]


def _run(name: str) -> None:
    if not (TOP / "molecule" / name / "molecule.yml").exists():
        pytest.fail(f"molecule/{name}/molecule.yml is missing")
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"molecule-{name}.log"
    env = dict(os.environ)
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    env.setdefault("PY_COLORS", "0")
    started = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run(["molecule", "test", "-s", name], cwd=TOP, env=env,
                              stdout=fh, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - started
    print(f"molecule scenario={name} rc={proc.returncode} seconds={elapsed:.0f} log={log}")
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-80:])
        pytest.fail(f"molecule test -s {name} failed (rc={proc.returncode}); "
                    f"tail of {log}:\n{tail}")


# A scenario converges JVM services on 2 cores: far beyond the suite's default per-test timeout.
@pytest.mark.timeout(3000)
@pytest.mark.molecule
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario: str) -> None:
    _run(scenario)


@pytest.mark.timeout(3600)
@pytest.mark.molecule
@pytest.mark.full
@pytest.mark.parametrize("scenario", FULL_SCENARIOS)
def test_full_scenario(scenario: str) -> None:
    _run(scenario)
