"""site.yml's tiers answer to their tags: `--tags <tier>` lists the validation plays (tagged
`always`) and that tier's play, and no task of another tier; playbooks/rolling-restart.yml's
`--tags kafka|elasticsearch` likewise. Asked of ansible-playbook itself (--list-tasks, which
connects to no host) on the example inventory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness.playbook import ANSIBLE_PLAYBOOK, run_playbook

TOP = Path(__file__).resolve().parents[2]
EXAMPLE = TOP / "inventories" / "example"
TIERS = {"common": "Common host setup", "kafka": "Kafka (KRaft controllers and brokers)",
         "elasticsearch": "Elasticsearch cluster", "kibana": "Kibana",
         "logpipe": "Logpipe producer timer and consumers"}
VALIDATE = {"Validate the Kafka layout", "Validate the logpipe settings against the layout"}
# Ansible validates a role's arguments (tagged always) in every play that names the role; that
# task checks variables and changes nothing, so it does not count as the tier running.
ARGSPEC = "Validating arguments against arg spec"
PLAY = re.compile(r"^  play #\d+ \((?P<hosts>[^)]*)\): (?P<name>.*?)\tTAGS: \[(?P<tags>[^\]]*)\]$")

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


def plays_with_tasks(tmp: Path, playbook: str, tags: str | None) -> dict[str, int]:
    """{play name: number of tasks listed} for the plays that have any, as --list-tasks says."""
    proc = run_playbook(tmp, EXAMPLE, TOP / playbook, "--list-tasks",
                        *(["--tags", tags] if tags else []))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    counts: dict[str, int] = {}
    play = ""
    for line in proc.stdout.splitlines():
        match = PLAY.match(line)
        if match:
            play = match.group("name")
        elif play and line.startswith("      ") and line.strip() and ARGSPEC not in line:
            counts[play] = counts.get(play, 0) + 1
    return {name: n for name, n in counts.items() if n}


def test_every_tier_play_is_tagged_and_listed(tmp_path: Path) -> None:
    assert set(plays_with_tasks(tmp_path, "site.yml", None)) == VALIDATE | set(TIERS.values())


@pytest.mark.parametrize("tier", list(TIERS))
def test_site_tags_select_one_tier(tmp_path: Path, tier: str) -> None:
    assert set(plays_with_tasks(tmp_path, "site.yml", tier)) == VALIDATE | {TIERS[tier]}


@pytest.mark.parametrize(("tags", "plays"), [
    ("kafka", {"Rolling restart of the KRaft controllers", "Rolling restart of the brokers"}),
    ("elasticsearch", {"Rolling restart of the Elasticsearch nodes"}),
])
def test_rolling_restart_tags_select_one_cluster(
        tmp_path: Path, tags: str, plays: set[str]) -> None:
    assert set(plays_with_tasks(tmp_path, "playbooks/rolling-restart.yml", tags)) == plays


def test_paths_the_playbooks_name_exist() -> None:
    """The headers point newcomers at files (two hops from site.yml): those files exist."""
    named = set()
    for playbook in [TOP / "site.yml", *sorted((TOP / "playbooks").glob("*.yml"))]:
        for line in playbook.read_text().splitlines():
            if line.lstrip().startswith("#"):
                named |= set(re.findall(r"\b((?:roles|playbooks|scripts|systemd|docs)/[\w./-]*\w)",
                                        line))
    assert any("restart-node.yml" in n for n in named)
    missing = sorted(n for n in named if not (TOP / n).exists())
    assert not missing, missing
