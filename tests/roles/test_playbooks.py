"""site.yml's tiers answer to their tags: `--tags <tier>` lists the validation plays (tagged
`always`) and that tier's play, and no task of another tier; playbooks/rolling-restart.yml's
`--tags kafka|elasticsearch` likewise. Every role task carries a phase tag (README.md, "Tags"),
and each phase selects its own tasks. Asked of ansible-playbook itself (--list-tasks, which
connects to no host) on the example inventory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
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
PHASES = {"install", "config", "service", "restart"}
TASK = re.compile(r"^      (?P<name>.*?)\tTAGS: \[(?P<tags>[^\]]*)\]$")
PLAY = re.compile(r"^  play #\d+ \((?P<hosts>[^)]*)\): (?P<name>.*?)\tTAGS: \[(?P<tags>[^\]]*)\]$")

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


def plays_with_tasks(tmp: Path, playbook: str, tags: str | None) -> dict[str, int]:
    """{play name: number of tasks listed} for the plays that have any, as --list-tasks says.
    A tier play's tasks tagged `always` run in every play and change nothing (checked below), so
    they do not count as the play running."""
    proc = run_playbook(tmp, EXAMPLE, TOP / playbook, "--list-tasks",
                        *(["--tags", tags] if tags else []))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    counts: dict[str, int] = {}
    play = ""
    for line in proc.stdout.splitlines():
        match = PLAY.match(line)
        if match:
            play = match.group("name")
        elif (play and line.startswith("      ") and line.strip() and ARGSPEC not in line
              and not (play not in VALIDATE and re.search(r"TAGS: \[.*\balways\b", line))):
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


def tasks_listed(tmp: Path, *args: str) -> dict[str, set[str]]:
    """{role task name: its tags} as site.yml --list-tasks prints them (imports expanded)."""
    proc = run_playbook(tmp, EXAMPLE, TOP / "site.yml", "--list-tasks", *args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return {m.group("name"): set(m.group("tags").split(", "))
            for m in map(TASK.match, proc.stdout.splitlines())
            if m and " : " in m.group("name") and ARGSPEC not in m.group("name")}


def test_every_role_task_has_a_phase_tag(tmp_path: Path) -> None:
    untagged = sorted(name for name, tags in tasks_listed(tmp_path).items()
                      if not tags & (PHASES | {"always"}))
    assert not untagged, untagged


# What a task tagged `always` may do: it runs in every play whatever the tags, so it only checks,
# reads or reports. A request only reads (GET), a command says it changes nothing.
READ_ONLY = {"assert", "debug", "set_fact", "meta", "setup", "stat", "slurp", "fail",
             "wait_for", "include_tasks", "import_tasks"}


def always_tasks(path: Path, tasks: list[dict] | None = None,
                 inherited: bool = False) -> list[tuple[str, dict]]:
    """(file: task name, task) for every task tagged always in a task file (or in `tasks`, a block
    of it), through blocks, imports and includes."""
    found = []
    for task in yaml.safe_load(path.read_text()) if tasks is None else tasks:
        always = inherited or "always" in (task.get("tags") or [])
        for key in ("block", "rescue", "always"):
            if isinstance(task.get(key), list):
                found += always_tasks(path, task[key], always)
        for key in ("ansible.builtin.import_tasks", "ansible.builtin.include_tasks"):
            if key in task:
                target = task[key]["file"] if isinstance(task[key], dict) else task[key]
                found += always_tasks(path.parent / target, None, always)
        if always:
            found.append((f"{path.relative_to(TOP)}: {task.get('name')}", task))
    return found


def test_always_tasks_change_nothing() -> None:
    wrong = []
    for main in sorted(TOP.glob("roles/*/tasks/main.yml")):
        for where, task in always_tasks(main):
            if "block" in task:
                continue  # its tasks are listed themselves
            module = next((k.rsplit(".", 1)[-1] for k in task if k.startswith("ansible.")), "")
            if module == "uri":
                if task["ansible.builtin.uri"].get("method", "GET") not in ("GET", "HEAD"):
                    wrong.append(f"{where} (uri {task['ansible.builtin.uri']['method']})")
            elif module == "command":
                if task.get("changed_when") is not False:
                    wrong.append(f"{where} (command without changed_when: false)")
            elif module not in READ_ONLY:
                wrong.append(f"{where} ({module})")
    assert not wrong, wrong


RESTART = "kafka : Restart the marked nodes one at a time, health-gated"
REPORT = "kafka : Report the nodes that still need a restart"
USER = "kafka : Create the kafka user"
PROPERTIES = "kafka : Write server.properties"
START = "kafka : Enable and start Kafka"
ES_HEALTH = ("elasticsearch : Wait for the node to answer and the cluster to reach the wanted "
             "health with all nodes")


@pytest.mark.parametrize(("phase", "listed", "left_out"), [
    ("install", {USER, "logpipe : Create the install directory", REPORT},
     {PROPERTIES, START, RESTART, ES_HEALTH}),
    ("config", {PROPERTIES, RESTART, ES_HEALTH, REPORT}, {USER, START}),
    ("service", {START, "elasticsearch : Enable and start Elasticsearch", RESTART, REPORT},
     {USER, PROPERTIES}),
    ("restart", {RESTART, ES_HEALTH, REPORT}, {USER, PROPERTIES, START}),
])
def test_a_phase_tag_selects_its_tasks(
        tmp_path: Path, phase: str, listed: set[str], left_out: set[str]) -> None:
    names = set(tasks_listed(tmp_path, "--tags", phase))
    assert listed <= names, sorted(listed - names)
    assert not left_out & names, sorted(left_out & names)


def test_a_phase_include_passes_its_tags_on() -> None:
    """Tags on include_tasks/include_role tag only the include itself; `apply` gives them to the
    included tasks, without which `--tags config` would run the include and skip its content."""
    def tasks_in(tasks: list[dict]) -> list[dict]:
        found = []
        for task in tasks:
            found.append(task)
            for key in ("block", "rescue", "always"):
                if isinstance(task.get(key), list):
                    found += tasks_in(task[key])
        return found

    missing = []
    for path in sorted(TOP.glob("roles/*/tasks/**/*.yml")):
        for task in tasks_in(yaml.safe_load(path.read_text()) or []):
            for key in ("ansible.builtin.include_tasks", "ansible.builtin.include_role"):
                if key in task and task.get("tags"):
                    args = task[key] if isinstance(task[key], dict) else {}
                    if args.get("apply", {}).get("tags") != task["tags"]:
                        missing.append(f"{path.relative_to(TOP)}: {task['name']}")
    assert not missing, missing


ROLES = ["common", "kafka", "elasticsearch", "kibana", "logpipe"]


def test_a_roles_checks_are_gated_on_its_selection() -> None:
    """Tagged always, a role's checks and facts (and its tier playbook's fact gathering) would
    also run under `--tags <another tier>`, and fail there on a tier not installed yet: each is
    gated on __<role>_selected."""
    ungated = []
    for role in ROLES:
        main = TOP / "roles" / role / "tasks" / "main.yml"
        for task in yaml.safe_load(main.read_text()):
            if ("always" in (task.get("tags") or []) and "ansible.builtin.meta" not in task
                    and f"__{role}_selected" not in str(task.get("when", ""))):
                ungated.append(f"{role}: {task['name']}")
        for play in yaml.safe_load((TOP / "playbooks" / f"{role}.yml").read_text()):
            ungated += [f"playbooks/{role}.yml: {task['name']}"
                        for task in play.get("pre_tasks", [])
                        if task.get("when") != f"__{role}_selected"]
    assert not ungated, ungated


@pytest.mark.parametrize(("args", "selected"), [
    ([], set(ROLES)),
    (["--tags", "kafka"], {"kafka"}),
    (["--tags", "elasticsearch,logpipe"], {"elasticsearch", "logpipe"}),
    (["--tags", "config"], set(ROLES)),
    (["--skip-tags", "restart"], set(ROLES)),
])
def test_which_roles_a_run_selects(tmp_path: Path, args: list[str], selected: set[str]) -> None:
    """__<role>_selected as Ansible evaluates it (the roles' vars/main.yml, run on localhost)."""
    playbook = tmp_path / "selected.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "vars_files": [str(TOP / "roles" / role / "vars" / "main.yml") for role in ROLES],
        "tasks": [{"name": "Print", "tags": ["always"], "ansible.builtin.debug": {
            "msg": "selected=" + ",".join(
                f"{{{{ '{role}' if __{role}_selected else '' }}}}" for role in ROLES)}}],
    }]))
    proc = run_playbook(tmp_path, EXAMPLE, playbook, *args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    found = re.search(r"selected=([\w,]*)", proc.stdout)
    assert found, proc.stdout[-2000:]
    assert set(filter(None, found.group(1).split(","))) == selected
