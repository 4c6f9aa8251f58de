# Sourced by scripts: exports the pinned versions from pyproject.toml ([tool.logpipe.versions]).
# shellcheck shell=bash
_top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$(python3 - "$_top/pyproject.toml" <<'PY'
import sys, tomllib
v = tomllib.load(open(sys.argv[1], "rb"))["tool"]["logpipe"]["versions"]
for k, val in v.items():
    print(f"export {k.upper()}_VERSION={val!r}")
PY
)"
export LOGPIPE_TOP="$_top"
export LOGPIPE_CACHE="${LOGPIPE_CACHE:-$_top/.cache}"
