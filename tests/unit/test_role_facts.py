"""Each role variable is stated once: meta/argument_specs.yml is the source.

- every variable in defaults/main.yml is an option of the argument specs with the same default,
  and every option has a type, a description and a default (or is required and has none);
- the README's variable tables, and the comment above each variable in defaults/main.yml, are
  exactly what scripts/role-docs.py renders from the specs;
- variables a role keeps to itself are named ``__<role>_<name>`` (vars/main.yml, register,
  set_fact, task and block vars, loop variables; ansible-lint's var-naming accepts the form), a
  role or playbook passes another role only that role's own variables, and no file uses another
  form of internal name (``_<role>_x``, ``<role>__x``; unprefixed ``_x``/``__x`` fail the first
  check).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

TOP = Path(__file__).resolve().parents[2]
ROLES_DIR = TOP / "roles"
ROLES = sorted(p.parent.parent.name for p in ROLES_DIR.glob("*/meta/argument_specs.yml"))

_spec = importlib.util.spec_from_file_location("role_docs", TOP / "scripts" / "role-docs.py")
assert _spec is not None and _spec.loader is not None
role_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(role_docs)

# Facts a role publishes for its callers: public names that are no input (documented in the
# role's README, "Outputs" or where the fact is described).
OUTPUTS = {
    "pki": {"pki_host_changed", "pki_host_key_path", "pki_host_cert_path", "pki_host_ca_path",
            "pki_host_sans"},
    "elasticsearch": {"elasticsearch_kibana_service_token"},
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _options(role: str) -> dict[str, dict[str, Any]]:
    """Every option of every entry point; an option in two entry points must be the same."""
    merged: dict[str, dict[str, Any]] = {}
    for entry, spec in role_docs.load_specs(ROLES_DIR / role).items():
        for name, opt in (spec.get("options") or {}).items():
            assert merged.get(name, opt) == opt, f"{role}: {name} differs in entry point {entry}"
            merged[name] = opt
    return merged


# What an option may carry; anything else is a typo (or a flow mapping with an unquoted comma).
OPTION_KEYS = {"type", "elements", "required", "default", "choices", "no_log", "description",
               "options"}


def _check_option(where: str, opt: dict[str, Any]) -> list[str]:
    problems = []
    if set(opt) - OPTION_KEYS:
        problems.append(f"{where}: unexpected keys {sorted(set(opt) - OPTION_KEYS)}")
    if not opt.get("type"):
        problems.append(f"{where}: no type")
    desc = opt.get("description")
    if not desc or (isinstance(desc, list) and not all(desc)):
        problems.append(f"{where}: no description")
    for sub, sopt in (opt.get("options") or {}).items():
        problems += _check_option(f"{where}.{sub}", sopt)
    return problems


@pytest.mark.parametrize("role", ROLES)
def test_every_option_has_type_description_and_default(role: str) -> None:
    defaults = _yaml(ROLES_DIR / role / "defaults" / "main.yml") or {}
    problems = []
    for name, opt in _options(role).items():
        problems += _check_option(f"{role}: {name}", opt)
        if opt.get("required"):
            # Ansible refuses required together with a default, and a value in defaults/main.yml
            # would make `required` meaningless.
            if "default" in opt or name in defaults:
                problems.append(f"{role}: {name} is required but has a default")
        elif "default" not in opt:
            problems.append(f"{role}: {name} has no default in meta/argument_specs.yml")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("role", ROLES)
def test_defaults_equal_the_specs(role: str) -> None:
    defaults = _yaml(ROLES_DIR / role / "defaults" / "main.yml") or {}
    options = _options(role)
    problems = [f"{role}: defaults/main.yml has {name}, meta/argument_specs.yml does not"
                for name in defaults if name not in options]
    for name, opt in options.items():
        if opt.get("required"):
            continue
        if name not in defaults:
            problems.append(f"{role}: {name} has no value in defaults/main.yml")
        elif defaults[name] != opt.get("default"):
            problems.append(f"{role}: {name}: defaults/main.yml {defaults[name]!r} != "
                            f"meta/argument_specs.yml {opt.get('default')!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("role", ROLES)
def test_readme_tables_are_generated_from_the_specs(role: str) -> None:
    readme = ROLES_DIR / role / "README.md"
    text = readme.read_text()
    specs = role_docs.load_specs(ROLES_DIR / role)
    found = [m.group("entry") for m in role_docs.MARKERS.finditer(text)]
    assert sorted(found) == sorted(specs), (
        f"roles/{role}/README.md: role-docs tables for entry points {found}, specs have "
        f"{sorted(specs)}")
    assert role_docs.render_readme(text, specs) == text, (
        f"roles/{role}/README.md differs from meta/argument_specs.yml: run `make role-docs`")


@pytest.mark.parametrize("role", ROLES)
def test_defaults_comments_are_the_descriptions(role: str) -> None:
    text = (ROLES_DIR / role / "defaults" / "main.yml").read_text()
    specs = role_docs.load_specs(ROLES_DIR / role)
    assert role_docs.render_defaults(text, specs) == text, (
        f"roles/{role}/defaults/main.yml: a comment differs from meta/argument_specs.yml: "
        "run `make role-docs`")
    # Every variable has its description above it (the header and section lines aside).
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = role_docs.TOP_LEVEL_KEY.match(line)
        if match:
            assert i and lines[i - 1].startswith("# ") and not lines[i - 1].startswith("# ---"), (
                f"roles/{role}/defaults/main.yml:{i + 1}: {match.group('name')} has no comment")


def test_defaults_rendering() -> None:
    specs = {"main": {"options": {
        "x_a": {"description": ["Two", "parts."], "choices": ["a", ""]},
        "x_b": {"description": "Word " * 30}}}}
    text = ("---\n# Header.\n\n# --- Section ---\n# stale\n# comment\nx_a: a\n"
            "x_b:  # inline kept\n  - 1\nx_c: 3\n")
    out = role_docs.render_defaults(text, specs)
    assert out.splitlines() == [
        "---", "# Header.", "", "# --- Section ---", "# Two parts. Choices: a, ''.", "x_a: a",
        "# " + ("Word " * 19).strip(), "# " + ("Word " * 11).strip(),
        "x_b:  # inline kept", "  - 1", "x_c: 3"]
    assert role_docs.render_defaults(out, specs) == out


def test_rendering() -> None:
    opt = {"type": "list", "elements": "str", "default": ["a|b"], "description": "Pipes | escaped."}
    table = role_docs.render_table({"x_list": opt, "x_req": {"type": "int", "required": True,
                                                              "description": "Host var."}}, set())
    assert table.splitlines()[2:] == [
        "| `x_list` | list of str | `[a\\|b]` | Pipes \\| escaped. |",
        "| `x_req` | int | required | Host var. |",
    ]
    long = "{{ " + "x" * 90 + " }}"
    assert role_docs.render_default({"default": long}) == "computed (see meaning)"
    assert role_docs.render_default({"default": "{{ a }}/b"}) == "`{{ a }}/b`"
    assert role_docs.render_default({"default": ""}) == '`""`'
    assert role_docs.render_default({"default": False}) == "`false`"
    assert role_docs.render_default({"default": 30.0}) == "`30.0`"
    assert role_docs.render_meaning({"description": "Mode.", "choices": ["a", ""]}) == (
        'Mode. Choices: `a`, `""`.')


# --- Internal variable names ---------------------------------------------------------------------

INCLUDE_ROLE = {"ansible.builtin.include_role", "include_role", "ansible.builtin.import_role",
                "import_role"}
SET_FACT = {"ansible.builtin.set_fact", "set_fact"}


def _walk(tasks: Any, where: str) -> list[tuple[str, str, str, str | None]]:
    """(name, how it is set, file, role it is passed to) for every variable a task list sets."""
    found: list[tuple[str, str, str, str | None]] = []
    if not isinstance(tasks, list):
        return found
    for task in tasks:
        if not isinstance(task, dict):
            continue
        for key in ("block", "rescue", "always"):
            found += _walk(task.get(key), where)
        target = next((task[k] for k in INCLUDE_ROLE if k in task), None)
        target_role = str(target["name"]).split(".")[-1] if isinstance(target, dict) else None
        if "register" in task:
            found.append((task["register"], "register", where, None))
        for key in SET_FACT & set(task):
            found += [(n, "set_fact", where, None) for n in task[key] if n != "cacheable"]
        if isinstance(task.get("vars"), dict):
            found += [(n, "vars", where, target_role) for n in task["vars"]]
        loop_control = task.get("loop_control")
        if isinstance(loop_control, dict) and "loop_var" in loop_control:
            found.append((loop_control["loop_var"], "loop_var", where, None))
    return found


def _naming_problems(name: str, how: str, where: str, role: str | None,
                     target: str | None) -> list[str]:
    if target is not None:
        # Passed to another role's entry point: that role's own input, public or internal.
        if name in _options(target) or name.startswith(f"__{target}_"):
            return []
        return [f"{where}: {name} ({how}) is neither an option of roles/{target} nor __{target}_*"]
    if role is None:
        return []
    if name.startswith(f"__{role}_") or (how == "set_fact" and name in OUTPUTS.get(role, set())):
        return []
    return [f"{where}: {name} ({how}) should be named __{role}_<name> (internal) "
            f"or be a documented output in OUTPUTS"]


@pytest.mark.parametrize("role", ROLES)
def test_internal_variables_are_named_double_underscore_role(role: str) -> None:
    base = ROLES_DIR / role
    problems = []
    for path in sorted([*base.glob("tasks/**/*.yml"), *base.glob("handlers/*.yml")]):
        for name, how, where, target in _walk(_yaml(path), str(path.relative_to(TOP))):
            problems += _naming_problems(name, how, where, role, target)
    for name in _yaml(base / "vars" / "main.yml") or {}:
        problems += _naming_problems(name, "vars/main.yml", f"roles/{role}/vars/main.yml", role,
                                     None)
    assert not problems, "\n".join(problems)


def test_playbooks_pass_roles_their_own_variables() -> None:
    problems = []
    for path in sorted([TOP / "site.yml", *(TOP / "playbooks").glob("*.yml")]):
        where = str(path.relative_to(TOP))
        for play in _yaml(path) or []:
            for section in ("pre_tasks", "tasks", "post_tasks"):
                for name, how, _, target in _walk(play.get(section), where):
                    problems += _naming_problems(name, how, where, None, target)
    assert not problems, "\n".join(problems)


# Any other spelling of an internal name: _<role>_x, <role>__x.
OTHER_FORMS = re.compile(r"(?<![\w])(_(?:{r})_[a-z0-9]\w*|(?:{r})__\w+)".format(r="|".join(ROLES)))


def test_no_other_form_of_internal_name_anywhere() -> None:
    paths = [TOP / "site.yml", TOP / "README.md"]
    for folder in ("roles", "playbooks", "molecule", "inventories", "docs", "tests/roles"):
        paths += [p for p in (TOP / folder).rglob("*")
                  if p.is_file() and p.suffix in {".yml", ".yaml", ".j2", ".md"}]
    problems = [f"{p.relative_to(TOP)}:{n}: {m.group(1)}"
                for p in sorted(paths)
                for n, line in enumerate(p.read_text().splitlines(), 1)
                for m in OTHER_FORMS.finditer(line)]
    assert not problems, "internal variables are named __<role>_<name>:\n" + "\n".join(problems)


def test_other_forms_are_recognised() -> None:
    assert [m.group(1) for m in OTHER_FORMS.finditer(
        "x: '{{ hostvars[h]._elasticsearch_api_url }} {{ kafka__restart_host }}' "
        "__kafka_home elasticsearch_version kibana_elasticsearch_hosts")] == [
        "_elasticsearch_api_url", "kafka__restart_host"]
