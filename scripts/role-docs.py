#!/usr/bin/env python3
"""Write each role's variable docs (README tables, defaults/main.yml comments) from its specs.

A role variable is described in one place: its option in roles/<role>/meta/argument_specs.yml
(type, default, description, choices). defaults/main.yml holds the same default values (Ansible
reads them from there; tests/unit/test_role_facts.py checks both agree) under a comment that is
the option's description, rewritten here, so whoever opens defaults/main.yml reads each variable's
meaning beside its value. Section headers (`# --- Name ---`) and comments inside a value stay as
written. The README's tables are rendered from the specs between markers, one per entry point:

    <!-- BEGIN role-docs main ... -->
    <!-- END role-docs main -->

A later table of the same README leaves out options an earlier one listed (roles/pki's `host`
entry point shares the `main` options). Usage:

    scripts/role-docs.py           rewrite the tables and comments of every role (make role-docs)
    scripts/role-docs.py --check   exit 1 and name the files that differ

Standard library and PyYAML only (the venv has PyYAML through Ansible).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

TOP = Path(__file__).resolve().parents[1]
ROLES = TOP / "roles"

BEGIN = ("<!-- BEGIN role-docs {entry} "
         "(generated from meta/argument_specs.yml: edit there, then make role-docs) -->")
END = "<!-- END role-docs {entry} -->"
MARKERS = re.compile(
    r"^<!-- BEGIN role-docs (?P<entry>[a-z0-9_]+) .*?-->\n.*?^<!-- END role-docs (?P=entry) -->$",
    re.DOTALL | re.MULTILINE)
# A templated default longer than this is shown as "computed"; its description says how.
TEMPLATE_WIDTH = 80
# defaults/main.yml: the line length yamllint allows (.yamllint), and what starts a section header.
COMMENT_WIDTH = 100
SECTION = "# ---"
TOP_LEVEL_KEY = re.compile(r"^(?P<name>[a-z][a-z0-9_]*):(?:\s|$)")


def load_specs(role_dir: Path) -> dict[str, Any]:
    """The role's argument_specs: {entry point: {short_description, options, ...}}."""
    data = yaml.safe_load((role_dir / "meta" / "argument_specs.yml").read_text())
    specs: dict[str, Any] = data["argument_specs"]
    return specs


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped (also inside code spans, as GitHub wants), and
    outside code spans `<` escaped so that placeholders like <conf> are not taken for HTML."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _code(text: str) -> str:
    return f"`{text}`" if text else '`""`'


def _flow(value: Any) -> str:
    """A value as YAML flow text, the way it would be written in an inventory."""
    dumped: str = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return dumped.strip().removesuffix("...").strip()


def _description(opt: dict[str, Any]) -> str:
    desc = opt.get("description", "")
    return " ".join(desc) if isinstance(desc, list) else str(desc)


def render_type(opt: dict[str, Any]) -> str:
    kind = str(opt.get("type", "str"))
    if kind == "list" and "elements" in opt:
        return f"list of {opt['elements']}"
    return kind


def render_default(opt: dict[str, Any]) -> str:
    if opt.get("required"):
        return "required"
    if "default" not in opt:
        return "none"
    value = opt["default"]
    if isinstance(value, str):
        if "{{" in value or "{%" in value:
            flat = " ".join(value.split())
            return _code(flat) if len(flat) <= TEMPLATE_WIDTH else "computed (see meaning)"
        return _code(value)
    return _code(_flow(value))


def render_meaning(opt: dict[str, Any]) -> str:
    parts = [_description(opt)]
    if "choices" in opt:
        parts.append("Choices: " + ", ".join(_code(str(c)) for c in opt["choices"]) + ".")
    sub = opt.get("options")
    if sub:
        items = []
        for name, sopt in sub.items():
            flags = [render_type(sopt)] + (["required"] if sopt.get("required") else [])
            text = f"{_code(name)} ({', '.join(flags)}): {_description(sopt).rstrip('.')}"
            if "choices" in sopt:
                text += ", one of " + ", ".join(_code(str(c)) for c in sopt["choices"])
            items.append(text)
        lead = "Keys of each item" if opt.get("type") == "list" else "Keys"
        parts.append(f"{lead}: " + "; ".join(items) + ".")
    return " ".join(p for p in parts if p)


def render_table(options: dict[str, Any], skip: set[str]) -> str:
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, opt in options.items():
        if name in skip:
            continue
        rows.append("| " + " | ".join(_cell(c) for c in (
            _code(name), render_type(opt), render_default(opt), render_meaning(opt))) + " |")
    return "\n".join(rows)


def render_readme(text: str, specs: dict[str, Any], where: str = "README.md") -> str:
    """The README with every marked table rendered again from the specs."""
    listed: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        entry = match.group("entry")
        if entry not in specs:
            raise SystemExit(f"{where}: no entry point {entry!r} in meta/argument_specs.yml")
        options = specs[entry].get("options", {})
        table = render_table(options, listed)
        listed.update(options)
        return "\n".join([BEGIN.format(entry=entry), table, END.format(entry=entry)])

    return MARKERS.sub(replace, text)


def all_options(specs: dict[str, Any]) -> dict[str, Any]:
    """Every entry point's options, the first entry point's description winning."""
    merged: dict[str, Any] = {}
    for spec in specs.values():
        for name, opt in spec.get("options", {}).items():
            merged.setdefault(name, opt)
    return merged


def comment_lines(opt: dict[str, Any]) -> list[str]:
    """An option's description as a defaults/main.yml comment, wrapped to the allowed width."""
    text = _description(opt)
    if "choices" in opt:
        text += " Choices: " + ", ".join(_flow(c) for c in opt["choices"]) + "."
    return textwrap.wrap(text, COMMENT_WIDTH - 2, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False, break_long_words=False)


def render_defaults(text: str, specs: dict[str, Any]) -> str:
    """defaults/main.yml with the comment directly above each variable replaced by its spec's
    description. A variable the specs do not know keeps its comment (the test reports it)."""
    options = all_options(specs)
    out: list[str] = []
    for line in text.splitlines():
        match = TOP_LEVEL_KEY.match(line)
        if match and match.group("name") in options:
            while out and out[-1].startswith("#") and not out[-1].startswith(SECTION) \
                    and out[-1] != "#":
                out.pop()
            out.extend(comment_lines(options[match.group("name")]))
        out.append(line)
    return "\n".join(out) + "\n"


def role_dirs() -> list[Path]:
    return sorted(p.parent.parent for p in ROLES.glob("*/meta/argument_specs.yml"))


def refresh(path: Path, new: str, what: str, write: bool) -> bool:
    """Whether `path` differs from `new`; rewritten when `write`."""
    if path.read_text() == new:
        return False
    if write:
        path.write_text(new)
        print(f"{path.relative_to(TOP)}: {what} rewritten")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report differences, write nothing")
    args = parser.parse_args(argv)
    differ: list[Path] = []
    missing: list[str] = []
    for role_dir in role_dirs():
        specs = load_specs(role_dir)
        defaults = role_dir / "defaults" / "main.yml"
        if defaults.exists() and refresh(
                defaults, render_defaults(defaults.read_text(), specs), "comments", not args.check):
            differ.append(defaults)
        readme = role_dir / "README.md"
        where = str(readme.relative_to(TOP))
        text = readme.read_text()
        if not MARKERS.search(text):
            print(f"{where}: no role-docs markers", file=sys.stderr)
            missing.append(where)
        elif refresh(readme, render_readme(text, specs, where), "tables", not args.check):
            differ.append(readme)
    if args.check and differ:
        print("variable docs differ from meta/argument_specs.yml (run make role-docs): "
              + ", ".join(str(p.relative_to(TOP)) for p in differ), file=sys.stderr)
        return 1
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
