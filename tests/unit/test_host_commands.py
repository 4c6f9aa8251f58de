"""A fresh machine can run every script: each program that scripts/*.sh, the Makefile's recipes and
.ci/run call is a shell builtin, keyword or function, a script of this repository, a tool of the
project's venv, or comes from a Debian package that is either in scripts/host-packages.txt (the
install list .ci/run and `make lab` install), in scripts/host-packages-vagrant.txt (what only the
VM lab, `make vagrant-smoke`, adds; one installer for both) or part of every base Debian system
(Priority required / Essential).

`make lab` once failed on a fresh machine because a script called `cpio`, which nothing installed
and the developer's machine happened to have. Which package provides a command is a committed
table (``COMMAND_PACKAGES``), not the machine's PATH: a developer's awk may be gawk and their
docker a static binary, while a fresh Debian has mawk and docker.io. Where dpkg knows the
packages, the table is checked against them (the package ships the command; the base packages
really are required/Essential).

Commands are read from the shell text with a small tokenizer (quotes, ``$(...)``, backticks,
process substitution, here-documents, ``case`` patterns, ``[[ ]]``, ``(( ))``, wrappers such as
``nohup``, ``exec``, ``xargs``, ``find -exec`` and ``trap``). Code run elsewhere (a quoted script
given to ``docker exec ... bash -c``, arguments after ``ssh``) is not this machine's and is not
counted.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
INSTALL_LIST = TOP / "scripts" / "host-packages.txt"
# The VM lab's extras (libvirt, QEMU, ...): installed by scripts/vagrant-smoke.sh, not by CI.
VAGRANT_LIST = TOP / "scripts" / "host-packages-vagrant.txt"
INSTALLER = "scripts/install-host-packages.sh"

# Debian packages every base system has (Priority: required, most of them Essential: yes).
BASE_PACKAGES = frozenset({
    "apt", "bash", "coreutils", "debianutils", "diffutils", "dpkg", "findutils", "grep", "gzip",
    "mawk", "sed", "tar", "util-linux",
})

# Command -> the Debian package that provides it on a fresh machine.
COMMAND_PACKAGES = {
    # base
    **dict.fromkeys(
        ("basename", "cat", "chmod", "chown", "cp", "cut", "date", "dirname", "env", "head", "id",
         "install", "ln", "ls", "mkdir", "mktemp", "mv", "nohup", "readlink", "realpath", "rm",
         "seq", "sha256sum", "sleep", "sort", "stat", "tail", "tee", "touch", "tr", "uname",
         "wc", "chroot", "du"), "coreutils"),
    "find": "findutils", "xargs": "findutils",
    "grep": "grep", "sed": "sed", "cmp": "diffutils", "diff": "diffutils", "tar": "tar",
    "gzip": "gzip", "awk": "mawk", "bash": "bash", "dpkg": "dpkg", "dpkg-query": "dpkg",
    "apt-get": "apt", "apt-cache": "apt", "flock": "util-linux", "setsid": "util-linux",
    # from scripts/host-packages.txt
    "make": "make", "python3": "python3",
    "docker": "docker.io", "dockerd": "docker.io", "pgrep": "procps",
    "debootstrap": "debootstrap", "mvn": "maven",
    "ssh": "openssh-client", "ssh-keygen": "openssh-client", "curl": "curl",
    "openssl": "openssl", "vagrant": "vagrant",
    # Run by bench/peer.py (Python, not scanned here): the table still checks the package
    # ships it.
    "rsyslogd": "rsyslog",
    # from scripts/host-packages-vagrant.txt (the VM lab: build-vagrant-box.sh, vagrant-smoke.sh)
    "qemu-img": "qemu-utils", "mkfs.ext4": "e2fsprogs", "ip": "iproute2",
    "slirp4netns": "slirp4netns", "virsh": "libvirt-clients",
    # libvirt-daemon-system depends on libvirt-daemon, which ships them.
    "libvirtd": "libvirt-daemon-system", "virtlogd": "libvirt-daemon-system",
}
# Commands reached through Debian's alternatives: the binary the package really ships.
ALTERNATIVE_BINARIES = {"awk": "mawk"}

# Tools of the project's venv (`make venv` installs them from pyproject.toml's extras).
VENV_TOOLS = frozenset({
    "ansible-inventory", "ansible-lint", "ansible-playbook", "molecule", "mypy", "pip", "pytest",
    "python", "ruff", "yamllint",
})

# Commands given through a variable: what each stands for on this machine.
DYNAMIC_COMMANDS = {
    # build-wheelhouse.sh: $PIP, else the venv's pip, else `python3 -m pip`.
    "$pip": ("python3",),
}

# Wrappers whose next word is a command run on this machine.
_WRAPPERS = {"nohup", "setsid", "exec", "time", "builtin", "env", "xargs"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
_SEPARATORS = {"\n", ";", "&", "&&", "||", "|", "|&", "(", ")", ";;", ";&", ";;&"}
_REDIRECTS = {">", ">>", "<", ">&", "<&", "&>", "&>>", ">|", "<<", "<<-", "<<<", "<>"}


@functools.cache
def _shell_words() -> frozenset[str]:
    """bash's own builtins and reserved words, from bash itself (Essential on Debian)."""
    out = subprocess.run(["bash", "-c", "compgen -b; compgen -k"], capture_output=True,
                         text=True, check=True).stdout
    return frozenset(out.split())


@dataclass
class Token:
    kind: str  # "word" or "op"
    text: str  # the word as written (quotes and substitutions kept), or the operator
    line: int

    @property
    def value(self) -> str:
        """The word with its quotes removed (substitutions kept as written)."""
        return _unquote(self.text)


def _unquote(text: str) -> str:
    out, i, in_double = [], 0, False
    while i < len(text):
        c = text[i]
        if c == "'" and not in_double:
            j = text.index("'", i + 1)
            out.append(text[i + 1:j])
            i = j + 1
        elif c == '"':
            in_double = not in_double
            i += 1
        elif c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


_HEREDOC = re.compile(r"(?<!<)<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


def _drop_heredoc_bodies(text: str) -> str:
    """Blank out here-document bodies (Python code, file content), keeping line numbers."""
    lines = text.split("\n")
    out: list[str] = []
    pending: list[tuple[str, bool]] = []
    for line in lines:
        if pending:
            delim, strip_tabs = pending[0]
            if (line.lstrip("\t") if strip_tabs else line) == delim:
                pending.pop(0)
            out.append("")
            continue
        out.append(line)
        if "#" in line and line.lstrip().startswith("#"):
            continue
        for m in _HEREDOC.finditer(line):
            pending.append((m.group(2), m.group(0).startswith("<<-")))
    return "\n".join(out)


@dataclass
class Scan:
    """The command words of one shell text (with the functions it defines)."""

    commands: list[tuple[int, str]] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, text: str, first_line: int = 1) -> Scan:
        scan = cls()
        scan._streams: list[list[Token]] = []
        text = _drop_heredoc_bodies(text)
        tokens, _ = scan._tokenize(text, 0, first_line, stop=None)
        scan._streams.append(tokens)
        while scan._streams:
            scan._analyze(scan._streams.pop())
        return scan

    # -- tokenizer ---------------------------------------------------------------------------

    def _tokenize(self, s: str, i: int, line: int, stop: str | None
                  ) -> tuple[list[Token], int]:
        """Tokens from ``s[i:]`` up to ``stop`` (")" of a substitution) or the end; returns the
        tokens and the index after the stop. Nested substitutions become streams of their own."""
        tokens: list[Token] = []
        word: list[str] = []
        depth = 0
        self._line = line

        def end_word() -> None:
            if word:
                tokens.append(Token("word", "".join(word), self._line))
                word.clear()

        def op(text: str) -> None:
            end_word()
            tokens.append(Token("op", text, self._line))

        while i < len(s):
            c = s[i]
            nxt = s[i + 1] if i + 1 < len(s) else ""
            if c == "\n":
                op("\n")
                self._line += 1
                i += 1
            elif c in " \t":
                end_word()
                i += 1
            elif c == "#" and not word:
                while i < len(s) and s[i] != "\n":
                    i += 1
            elif c == "\\":
                if nxt == "\n":
                    self._line += 1
                else:
                    word.append(s[i:i + 2])
                i += 2
            elif c == "'":
                j = s.index("'", i + 1)
                word.append(s[i:j + 1])
                self._line += s.count("\n", i, j)
                i = j + 1
            elif c == '"':
                j = self._dquoted(s, i + 1)
                word.append(s[i:j + 1])
                i = j + 1
            elif c == "$" and s.startswith("$((", i):
                j = self._balanced(s, i + 1, "(", ")")
                self._substitutions(s[i + 3:j - 1])
                word.append(s[i:j + 1])
                i = j + 1
            elif c == "$" and nxt == "(":
                inner, j = self._tokenize(s, i + 2, self._line, stop=")")
                self._streams.append(inner)
                word.append(s[i:j])
                i = j
            elif c == "$" and nxt == "{":
                j = self._balanced(s, i + 1, "{", "}")
                self._substitutions(s[i + 2:j])
                word.append(s[i:j + 1])
                i = j + 1
            elif c == "`":
                j = s.index("`", i + 1)
                line = self._line
                inner, _ = self._tokenize(s[i + 1:j], 0, self._line, stop=None)
                self._line = line
                self._streams.append(inner)
                word.append(s[i:j + 1])
                i = j + 1
            elif c in "<>" and nxt == "(":
                inner, j = self._tokenize(s, i + 2, self._line, stop=")")
                self._streams.append(inner)
                word.append(s[i:j])
                i = j
            elif c in "<>" or (c == "&" and nxt == ">"):
                if word and "".join(word).isdigit():
                    word.clear()  # the fd number of 2>&1
                end_word()
                for candidate in ("<<<", "&>>", "<<-", "<<", ">>", ">&", "<&", "&>", ">|", "<>"):
                    if s.startswith(candidate, i):
                        op(candidate)
                        i += len(candidate)
                        break
                else:
                    op(c)
                    i += 1
            elif c in "|&;":
                for candidate in (";;&", ";;", ";&", "&&", "||", "|&", "|", "&", ";"):
                    if s.startswith(candidate, i):
                        op(candidate)
                        i += len(candidate)
                        break
            elif c == "(" and word and "".join(word).endswith("="):
                j = self._balanced(s, i, "(", ")")  # array assignment: a=( ... )
                self._substitutions(s[i + 1:j])
                word.append(s[i:j + 1])
                i = j + 1
            elif c == "(" and nxt == "(" and not word:
                j = self._balanced(s, i + 1, "(", ")")  # (( arithmetic ))
                self._substitutions(s[i + 2:j])
                word.append("((arithmetic))")
                end_word()
                i = j + 2
            elif c == "(":
                op("(")
                depth += 1
                i += 1
            elif c == ")":
                if stop == ")" and depth == 0:
                    end_word()
                    return tokens, i + 1
                op(")")
                depth -= 1
                i += 1
            else:
                word.append(c)
                i += 1
        end_word()
        return tokens, i

    def _dquoted(self, s: str, i: int) -> int:
        """Index of the closing quote of a double-quoted string starting at ``s[i]``; command
        substitutions inside it are scanned."""
        while s[i] != '"':
            if s[i] == "\\":
                i += 2
            elif (after := self._substitution(s, i)) is not None:
                i = after
            else:
                if s[i] == "\n":
                    self._line += 1
                i += 1
        return i

    def _substitution(self, s: str, i: int) -> int | None:
        """If ``s[i]`` starts ``$((...))``, ``$(...)``, ``${...}`` or a backquote, scan it for the
        commands it runs and return the index after it; else None."""
        if s.startswith("$((", i):
            j = self._balanced(s, i + 1, "(", ")")
            self._substitutions(s[i + 3:j - 1])
            return j + 1
        if s.startswith("$(", i):
            inner, after = self._tokenize(s, i + 2, self._line, stop=")")
            self._streams.append(inner)
            return after
        if s.startswith("${", i):
            j = self._balanced(s, i + 1, "{", "}")
            self._substitutions(s[i + 2:j])
            return j + 1
        if s[i] == "`":
            j = s.index("`", i + 1)
            self._streams.append(self._tokenize(s[i + 1:j], 0, self._line, None)[0])
            return j + 1
        return None

    def _substitutions(self, text: str) -> None:
        """Scan text that is not itself commands (``${...}``, ``$((...))``, an array's items)
        for the command substitutions in it."""
        line, i = self._line, 0
        while i < len(text):
            if text[i] == "\\":
                i += 2
            elif text[i] == "'":
                i = text.index("'", i + 1) + 1
            elif (after := self._substitution(text, i)) is not None:
                i = after
            else:
                i += 1
        self._line = line

    @staticmethod
    def _balanced(s: str, i: int, open_: str, close: str) -> int:
        """Index of the ``close`` matching ``s[i] == open_``."""
        depth = 0
        quote = ""
        while i < len(s):
            c = s[i]
            if quote:
                if c == "\\" and quote == '"':
                    i += 1
                elif c == quote:
                    quote = ""
            elif c in "'\"":
                quote = c
            elif c == "\\":
                i += 1
            elif c == open_:
                depth += 1
            elif c == close:
                depth -= 1
                if depth == 0:
                    return i
            i += 1
        raise ValueError(f"unbalanced {open_}{close} in {s[:80]!r}")

    # -- analysis ----------------------------------------------------------------------------

    def _analyze(self, tokens: list[Token]) -> None:
        expect = True  # the next word is in command position
        skip_target = False
        case_states: list[str] = []  # per open `case`: "word", "pattern" or "body"
        skip_until: str | None = None  # "]]", or "do" (for ... in ...)
        wrapper: str | None = None
        ip_words: list[str] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            i += 1
            if skip_until is not None:
                if tok.kind == "word" and tok.text == skip_until:
                    skip_until = None
                    expect = tok.text == "do"
                elif skip_until == "do" and tok.kind == "op" and tok.text in (";", "\n"):
                    skip_until, expect = None, True
                continue
            if case_states and case_states[-1] in ("word", "pattern"):
                if case_states[-1] == "word":
                    if tok.kind == "word" and tok.text == "in":
                        case_states[-1] = "pattern"
                elif tok.kind == "word" and tok.text == "esac":
                    case_states.pop()
                    expect = False
                elif tok.kind == "op" and tok.text == ")":
                    case_states[-1] = "body"
                    expect = True
                continue
            if tok.kind == "op":
                if tok.text in _REDIRECTS:
                    skip_target = True
                elif tok.text in (";;", ";&", ";;&") and case_states:
                    case_states[-1] = "pattern"
                elif tok.text in _SEPARATORS:
                    expect, wrapper = True, None
                continue
            if skip_target:
                skip_target = False
                continue
            word = tok.value
            if not expect:
                if wrapper == "find" and word in ("-exec", "-execdir", "-ok"):
                    expect = True
                elif wrapper == "ip":
                    # `ip netns exec NAME COMMAND...` runs COMMAND on this machine.
                    ip_words.append(word)
                    if ip_words[:2] != ["netns", "exec"][:len(ip_words[:2])]:
                        wrapper = None
                    elif len(ip_words) == 3:
                        expect, wrapper = True, None
                elif wrapper == "trap" and word == "-":
                    wrapper = None  # `trap - SIGNAL...`: reset; the rest are signal names
                elif wrapper == "trap" and not word.startswith("-"):
                    line = self._line
                    self._streams.append(self._tokenize(word, 0, tok.line, None)[0])
                    self._line = line
                    wrapper = None
                continue
            # Command position.
            if _ASSIGNMENT.match(tok.text):
                continue
            if i < len(tokens) - 1 and tokens[i].text == "(" and tokens[i + 1].text == ")":
                self.functions.add(word)  # name() { ...; }
                i += 2
                continue
            if word == "function":
                self.functions.add(tokens[i].value)
                i += 1
                continue
            if word in ("if", "then", "else", "elif", "do", "while", "until", "!", "{", "time"):
                continue
            if word in ("fi", "done", "}", "esac"):
                expect = False
                continue
            if word == "[[":
                skip_until = "]]"
                continue
            if word == "for":
                skip_until = "do"
                continue
            if word == "case":
                case_states.append("word")
                continue
            if word == "((arithmetic))":
                expect = False
                continue
            if wrapper is not None and word.startswith("-"):
                if wrapper == "command":
                    # `command -v X` only asks whether X exists.
                    expect, wrapper = False, None
                continue  # an option of the wrapper (xargs -r, env -i)
            self.commands.append((tok.line, word))
            expect = False
            wrapper = None
            if word in _WRAPPERS or word == "command":
                expect, wrapper = True, word
            elif word in ("find", "trap", "ip"):
                wrapper = word
                ip_words = []


# ---------------------------------------------------------------------------------------------
# the repository's shell


def _install_list(path: Path = INSTALL_LIST) -> list[str]:
    """Package names as scripts/install-host-packages.sh reads them (first word of a line)."""
    names = []
    for line in path.read_text().splitlines():
        first = line.split("#", 1)[0].split()
        if first:
            names.append(first[0])
    return names


def _make_recipes(path: Path) -> tuple[str, dict[str, str]]:
    """The Makefile's recipe lines as one shell text (blank lines elsewhere keep line numbers),
    with the Makefile's own variables expanded, and those variables."""
    text = path.read_text().replace("\\\n", "\x00")
    variables: dict[str, str] = {"MAKE": "make"}

    def expand(value: str) -> str:
        for _ in range(5):
            value = re.sub(r"\$\(abspath ([^()]*)\)", r"\1", value)
            value = re.sub(r"\$\(([A-Za-z_]+)\)",
                           lambda m: variables.get(m.group(1), m.group(0)), value)
        return value

    lines = []
    for line in text.split("\n"):
        m = re.match(r"(?:export\s+)?([A-Za-z_]+)\s*[:?]?=\s*(.*)", line)
        if m and not line.startswith("\t"):
            variables[m.group(1)] = expand(m.group(2).replace("\x00", " "))
        if line.startswith("\t"):
            recipe = expand(line[1:].lstrip("@-+").replace("$$", "\x01"))
            # Left over: a variable given on make's command line (make lab-shell HOST=es-1).
            recipe = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", r"${\1}", recipe)
            lines.append(recipe.replace("\x01", "$").replace("\x00", "\\\n"))
        else:
            lines.append("\n" * line.count("\x00"))
    return "\n".join(lines), variables


@dataclass
class Source:
    path: Path
    text: str
    venv_on_path: bool  # the file puts the venv's bin first on PATH


def _sources() -> list[Source]:
    out = []
    for path in [*sorted((TOP / "scripts").glob("*.sh")), TOP / ".ci" / "run"]:
        text = path.read_text()
        out.append(Source(path, text, re.search(r"PATH=\S*\.venv/bin", text) is not None))
    recipes, variables = _make_recipes(TOP / "Makefile")
    out.append(Source(TOP / "Makefile", recipes,
                      ".venv/bin" in variables.get("PATH", "")))
    return out


def _venv_tool(word: str) -> str | None:
    m = re.search(r"(?:^|/)[\w.-]*venv/bin/([\w.-]+)$", word)
    return m.group(1) if m else None


def _project_script(word: str, source: Path) -> Path | None:
    """The repository file a command path names, if it names one."""
    for prefix, base in (("$TOP/", TOP), ("$LOGPIPE_TOP/", TOP), ("${LOGPIPE_TOP}/", TOP),
                         ('$(dirname "$0")/', source.parent), ("$(dirname $0)/", source.parent),
                         ("./", TOP), ("", TOP)):
        if word.startswith(prefix):
            candidate = base / word[len(prefix):]
            if candidate.is_file() and TOP in candidate.resolve().parents:
                return candidate
    return None


def problems(source: Source) -> list[str]:
    """What a fresh machine would lack to run ``source``: ``file:line: command (why)``."""
    scan = Scan.of(source.text)
    shell = _shell_words()
    listed = set(_install_list()) | set(_install_list(VAGRANT_LIST))
    rel = source.path.relative_to(TOP)
    out = []
    for line, word in scan.commands:
        where = f"{rel}:{line}: {word}"
        if word in shell or word in scan.functions:
            continue
        tool = _venv_tool(word)
        if tool is not None:
            if tool not in VENV_TOOLS:
                out.append(f"{where}: not a tool the venv provides ({sorted(VENV_TOOLS)})")
            continue
        if word.startswith("$") and word in DYNAMIC_COMMANDS:
            needs = DYNAMIC_COMMANDS[word]
        elif "/" in word:
            if _project_script(word, source.path) is None:
                out.append(f"{where}: a path that is no file of this repository")
            continue
        elif word.startswith("$"):
            out.append(f"{where}: a command chosen at run time; say what it stands for in "
                       "DYNAMIC_COMMANDS")
            continue
        elif word in VENV_TOOLS and source.venv_on_path:
            continue
        else:
            needs = (word,)
        for command in needs:
            package = COMMAND_PACKAGES.get(command)
            if package is None:
                out.append(f"{where}: no package known for `{command}`: add the package that "
                           f"provides it to scripts/host-packages.txt and COMMAND_PACKAGES "
                           f"(or do without it)")
            elif package not in listed and package not in BASE_PACKAGES:
                out.append(f"{where}: `{command}` comes from {package}, which is neither in "
                           f"scripts/host-packages.txt nor part of a base Debian system")
    return out


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("source", _sources(), ids=lambda s: str(s.path.relative_to(TOP)))
def test_every_called_program_is_installed_on_a_fresh_machine(source: Source) -> None:
    found = problems(source)
    assert not found, "\n".join(found)


def test_the_scan_sees_the_commands_of_each_script() -> None:
    """Guards against a scanner that silently sees nothing: known calls of each file."""
    expected = {
        "scripts/build-wheelhouse.sh": {"python3", "$pip", "find", "touch", "cmp", "sha256sum",
                                        "cp", "mktemp", "rm"},
        "scripts/ensure-docker.sh": {"docker", "dockerd", "pgrep", "setsid", "nohup", "seq",
                                     "sleep"},
        "scripts/build-base-image.sh": {"debootstrap", "docker", "grep", "awk", "tar"},
        "scripts/fetch-kafka.sh": {"mvn", "ls", "touch"},
        "scripts/lab.sh": {"ssh", "python3", "ansible-playbook", "ansible-inventory", "sed", "awk",
                           "tee"},
        "scripts/versions.sh": {"python3", "dirname", "pwd"},
        ".ci/run": {"date", "make", "scripts/install-host-packages.sh"},
        "scripts/build-vagrant-box.sh": {"debootstrap", "mkfs.ext4", "qemu-img", "chroot", "tar",
                                         "ssh-keygen", "sha256sum"},
        "scripts/vagrant-smoke.sh": {"ip", "slirp4netns", "virtlogd", "libvirtd", "virsh",
                                     "vagrant", "ssh", "curl", "tee", "pgrep"},
        "Makefile": {"python3", ".venv/bin/pip", ".venv/bin/pytest", "make", "scripts/lab.sh",
                     "sort"},
    }
    by_file = {str(s.path.relative_to(TOP)): {w for _, w in Scan.of(s.text).commands}
               for s in _sources()}
    for name, want in expected.items():
        assert want <= by_file[name], f"{name}: missing {sorted(want - by_file[name])}"


@pytest.mark.parametrize(("text", "called"), [
    ("cpio -o < list", {"cpio"}),
    ('x=$(find . | cpio -o)', {"find", "cpio"}),
    ('echo "files: $(ls | cpio -o 2>&1)"', {"echo", "ls", "cpio"}),
    ("nohup cpio -i &", {"nohup", "cpio"}),
    ("trap 'cpio -i; rm -rf \"$w\"' EXIT", {"trap", "cpio", "rm"}),
    ("find . -exec cpio {} +", {"find", "cpio"}),
    ("ls | xargs -r cpio", {"ls", "xargs", "cpio"}),
    ("while read -r f; do cpio \"$f\"; done < <(ls)", {"read", "cpio", "ls"}),
    ('n=$(( $(cpio -t | wc -l) + 1 ))', {"cpio", "wc"}),
    ("if (( n > 1 )); then cpio; fi", {"cpio"}),
    ('case "$(cpio)" in\n  a|b) gzip ;;\n  *) tar ;;\nesac', {"cpio", "gzip", "tar"}),
    ("f() { cpio; }\nf", {"cpio", "f"}),
    ("LC_ALL=C cpio", {"cpio"}),
    ("a=(x y) && b+=(\"$(cpio)\")", {"cpio"}),
    ("x=${y:-$(cpio)}", {"cpio"}),
    ("exec cpio", {"exec", "cpio"}),
    ('ip netns exec "$ns" cpio -i', {"ip", "cpio"}),
    ("ip -n ns link set lo up && cpio", {"ip", "cpio"}),
    ("trap - EXIT; cpio", {"trap", "cpio"}),
    ("{ echo; cpio; } > out", {"echo", "cpio"}),
    # Not this machine's: quoted code for a container, arguments of ssh, a here-document,
    # a probe, comments, case patterns and [[ ]] operands.
    ("docker exec c bash -c 'cpio -i; rsync'", {"docker"}),
    ("ssh host cpio -i", {"ssh"}),
    ("python3 - <<'PY'\nimport cpio\ncpio.run()\nPY\necho", {"python3", "echo"}),
    ("command -v cpio >/dev/null || echo no", {"command", "echo"}),
    ("# cpio -i\necho # cpio", {"echo"}),
    ('case "$x" in\n  cpio|rsync) echo ;;\nesac', {"echo"}),
    ("[[ $x =~ ^(cpio|rsync)$ ]] && echo", {"echo"}),
    ("for f in cpio rsync; do echo \"$f\"; done", {"echo"}),
])
def test_scan(text: str, called: set[str]) -> None:
    assert {w for _, w in Scan.of(text).commands} == called


def test_a_new_program_fails_the_check(tmp_path: Path) -> None:
    """The issue's case: a script that calls cpio, which no base system or list provides."""
    original = (TOP / "scripts" / "build-wheelhouse.sh").read_text()
    changed = original.replace(
        'mkdir -p "$out"', 'mkdir -p "$out"\nfind logpipe -name "*.py" | cpio -pdm "$work/src"', 1)
    assert changed != original
    found = problems(Source(TOP / "scripts" / "build-wheelhouse.sh", changed, False))
    assert len(found) == 1 and ": cpio: no package known for `cpio`" in found[0], found


def test_one_install_list_for_ci_and_the_lab() -> None:
    """.ci/run and `make lab` (and lab.sh) install from scripts/host-packages.txt, and nothing
    else installs packages on this machine behind its back."""
    packages = _install_list()
    assert packages and len(packages) == len(set(packages)), packages
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p) for p in packages), packages
    ci = (TOP / ".ci" / "run").read_text()
    assert INSTALLER in ci
    assert re.search(r"^host-packages:\n\t" + re.escape(INSTALLER) + "$",
                     (TOP / "Makefile").read_text(), re.M)
    assert re.search(r"^lab: host-packages ", (TOP / "Makefile").read_text(), re.M)
    assert f"$TOP/{INSTALLER}" in (TOP / "scripts" / "lab.sh").read_text()
    installers = [str(s.path.relative_to(TOP)) for s in _sources()
                  if re.search(r"apt-get\s+install", s.text)]
    assert installers == [INSTALLER], installers
    installer = (TOP / INSTALLER).read_text()
    assert "host-packages.txt" in installer
    # The VM lab's extras go through the same installer, given the second list.
    vagrant = _install_list(VAGRANT_LIST)
    assert vagrant and len(vagrant) == len(set(vagrant)), vagrant
    smoke = (TOP / "scripts" / "vagrant-smoke.sh").read_text()
    assert f"$TOP/{INSTALLER}" in smoke and "host-packages-vagrant.txt" in smoke
    # The table's non-base packages are in the lists (a stale entry or a missing one shows).
    table = set(COMMAND_PACKAGES.values()) - BASE_PACKAGES
    assert table <= set(packages) | set(vagrant), sorted(table - set(packages) - set(vagrant))


@functools.cache
def _binaries(package: str) -> frozenset[str]:
    """File names under a bin/ or sbin/ directory that ``package`` installed."""
    files = _dpkg("-L", package) or ""
    return frozenset(os.path.basename(f) for f in files.split("\n") if re.search(r"/s?bin/", f))


@functools.cache
def _dpkg(*args: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", *args], capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else None


def test_base_packages_are_required_or_essential() -> None:
    """Checked against this machine's dpkg database where the package is installed."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg on this machine")
    checked = 0
    for package in sorted(BASE_PACKAGES):
        fields = _dpkg("-W", "-f", "${Priority} ${Essential}", package)
        if fields is None:
            continue
        checked += 1
        priority, _, essential = fields.partition(" ")
        assert priority == "required" or essential == "yes", f"{package}: {fields}"
    assert checked, "dpkg knows none of the base packages"


def test_table_packages_ship_their_commands() -> None:
    """Where dpkg has the package installed, it ships the command (so the table is true)."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg on this machine")
    checked = []
    for command, package in sorted(COMMAND_PACKAGES.items()):
        if _dpkg("-L", package) is None:
            continue
        binary = ALTERNATIVE_BINARIES.get(command, command)
        # The package or one it depends on (python3's /usr/bin/python3 is python3-minimal's).
        depends = _dpkg("-W", "-f", "${Pre-Depends}, ${Depends}", package) or ""
        owners = [package, *re.findall(r"(?:^|[,|]\s*)([a-z0-9][a-z0-9+.-]+)", depends)]
        assert any(binary in _binaries(owner) for owner in owners), \
            f"neither {package} nor what it depends on ships {binary}"
        checked.append(command)
    assert len(checked) >= len(COMMAND_PACKAGES) // 2, checked


def test_venv_tools_exist_in_the_running_venv() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running inside a venv")
    missing = [t for t in sorted(VENV_TOOLS) if not (Path(sys.prefix) / "bin" / t).exists()]
    assert not missing, missing


def test_no_path_of_a_machine_is_in_the_repository() -> None:
    """No absolute path of the machine a change was made on (its work tree, its notes, its home
    directory). Home directories inside Molecule's containers and the lab's hosts are theirs, not
    this machine's, and so are those of the image scripts/build-vagrant-box.sh writes."""
    if shutil.which("git") is None or not (TOP / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "-C", str(TOP), "ls-files", "-z"], capture_output=True,
                            check=True).stdout.decode().split("\0")
    # Built from parts so this file does not match itself.
    forbidden = re.compile("|".join(re.escape(p) for p in ("/" + "work/", "../" + "shared",
                                                           "/" + "root/", "/" + "home/")))
    found = []
    for name in filter(None, listed):
        path = TOP / name
        if not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for m in forbidden.finditer(line):
                inside_hosts = name.startswith(("molecule/", "roles/")) or (
                    name in ("scripts/lab.sh", "scripts/build-vagrant-box.sh")
                    and m.group() == "/" + "home/")
                if not inside_hosts:
                    found.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not found, "\n".join(found)
