"""roles/logpipe reads its unit files and wheelhouse builder from the controller (a checkout by
default): a missing path stops the play at the role's first check, naming the variable and the
path, before any host is changed. Run by Ansible itself against localhost (tasks_from: assert.yml,
whose path checks come first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness.playbook import ANSIBLE_PLAYBOOK, run_playbook

TOP = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


def _check(tmp: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp / "inventory").write_text(
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    play = [{"name": "Path checks", "hosts": "localhost", "gather_facts": False, "tasks": [{
        "name": "The role's checks",
        "ansible.builtin.include_role": {"name": "logpipe", "tasks_from": "assert.yml"},
        "vars": extra}]}]
    (tmp / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    return run_playbook(tmp, tmp / "inventory", tmp / "play.yml")


def test_missing_units_dir_is_named(tmp_path: Path) -> None:
    proc = _check(tmp_path, {"logpipe_units_dir": str(tmp_path / "nowhere")})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Check the unit files are on the controller" in out
    assert f"logpipe_units_dir ({tmp_path / 'nowhere'}) lacks logpipe-producer.service" in out


def test_missing_builder_is_named(tmp_path: Path) -> None:
    proc = _check(tmp_path, {"logpipe_wheelhouse_build_script": str(tmp_path / "build.sh")})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"logpipe_wheelhouse_build_script ({tmp_path / 'build.sh'}) is not a" in out


def test_a_checkout_passes_the_path_checks(tmp_path: Path) -> None:
    """The defaults point into this checkout: both path checks pass (the play then stops at the
    next check, for the inventory values this test does not give)."""
    proc = _check(tmp_path, {})
    out = proc.stdout + proc.stderr
    assert "ok: [localhost]" in out, out[-3000:]
    assert "lacks" not in out and "is not a file" not in out.replace("\n", " "), out[-3000:]
    assert "Check values the argument spec cannot express" in out
