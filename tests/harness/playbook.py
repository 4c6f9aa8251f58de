"""Run ansible-playbook from a test: the venv's binary, state kept in the test's own directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or \
    shutil.which("ansible-playbook")


def ansible_env(tmp: Path) -> dict[str, str]:
    """This environment plus the repository's roles and Ansible state under ``tmp``."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_ROLES_PATH=str(TOP / "roles"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    return env


def run_playbook(tmp: Path, inventory: Path, playbook: Path, *args: str,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook -i inventory playbook args...`` from the repository's top directory."""
    if ANSIBLE_PLAYBOOK is None:
        raise RuntimeError("ansible-playbook is not installed")
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(playbook), *args],
        cwd=TOP, env=ansible_env(tmp), capture_output=True, text=True, timeout=timeout,
        check=False,
    )
