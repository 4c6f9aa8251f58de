#!/usr/bin/env bash
# Build the wheelhouse roles/logpipe installs from: the logpipe wheel (built from this checkout)
# plus binary wheels of all its dependencies for one target CPython on x86_64 Linux, so hosts
# install with `pip install --no-index` and need no package index.
#   usage: scripts/build-wheelhouse.sh <3.11|3.13|bookworm|trixie> [out-dir]
#   default out-dir: .cache/wheelhouse/py<X.Y>; the last line printed is the wheelhouse directory.
# Dependency wheels are downloaded once per (Python version, dependency list) and then reused
# (a stamp file records what was downloaded), so later runs work offline. The logpipe wheel is
# rebuilt every time, reproducibly (SOURCE_DATE_EPOCH), and replaced only when its content
# changed; a line `wheelhouse_changed=true|false` says whether the directory changed.
set -euo pipefail
# shellcheck source=scripts/versions.sh
. "$(dirname "$0")/versions.sh"
target=${1:?usage: build-wheelhouse.sh <python-version 3.11|3.13|bookworm|trixie> [out-dir]}
case "$target" in
  bookworm) pyver=3.11 ;;
  trixie) pyver=3.13 ;;
  3.[0-9]|3.[0-9][0-9]) pyver=$target ;;
  *) echo "build-wheelhouse: unknown Python version or Debian suite: $target" >&2; exit 2 ;;
esac
out=${2:-$LOGPIPE_CACHE/wheelhouse/py$pyver}
abi="cp${pyver/./}"
# The controller's pip; any pip >= 23 can download for another interpreter version.
pip=${PIP:-}
if [ -z "$pip" ]; then
  if [ -x "$LOGPIPE_TOP/.venv/bin/pip" ]; then pip="$LOGPIPE_TOP/.venv/bin/pip"; else pip="python3 -m pip"; fi
fi
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")
trap 'rm -rf "$work"' EXIT
changed=false

# 1. The logpipe wheel. A fixed SOURCE_DATE_EPOCH and file times (1980-01-01, the zip epoch)
#    make an unchanged tree give a byte-identical wheel, whatever was committed meanwhile.
epoch=315532800
# Build from a copy of the package sources so the checkout gets no build/ or egg-info churn.
src="$work/src"; mkdir -p "$src"
cp -a "$LOGPIPE_TOP/pyproject.toml" "$LOGPIPE_TOP/README.md" "$src/"
(cd "$LOGPIPE_TOP" && find logpipe \( -name '*.py' -o -name '*.typed' -o -name '*.json' -o -name '*.toml' \) \
  -exec cp --parents -p -t "$src" {} +)
find "$src" -exec touch -h -d "@$epoch" {} +
SOURCE_DATE_EPOCH=$epoch $pip wheel --quiet --no-deps --wheel-dir "$work/wheel" "$src" >&2
new=$(ls "$work"/wheel/logpipe-*.whl)
name=$(basename "$new")
if [ -f "$out/$name" ] && cmp -s "$new" "$out/$name"; then
  echo "logpipe_wheel=$name unchanged" >&2
else
  rm -f "$out"/logpipe-*.whl
  cp "$new" "$out/$name"
  changed=true
  echo "logpipe_wheel=$name built sha256=$(sha256sum "$out/$name" | cut -c1-16)" >&2
fi

# 2. Dependency wheels for the target interpreter: manylinux binaries (confluent-kafka, orjson)
#    and pure wheels (elasticsearch, Faker, python-daemon and their dependencies).
deps=$(python3 - "$LOGPIPE_TOP/pyproject.toml" <<'PY'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
PY
)
stamp_value=$(printf '%s\n%s\n' "$pyver" "$deps" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$out/.deps.stamp" 2>/dev/null)" = "$stamp_value" ]; then
  echo "dependencies unchanged (python $pyver)" >&2
else
  echo "downloading dependency wheels for CPython $pyver" >&2
  mapfile -t reqs <<<"$deps"
  rm -f "$out"/.deps.stamp
  find "$out" -maxdepth 1 -name '*.whl' ! -name 'logpipe-*.whl' -delete
  $pip download --quiet --dest "$out" --only-binary=:all: \
    --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    "${reqs[@]}" >&2
  echo "$stamp_value" > "$out/.deps.stamp"
  changed=true
fi
echo "wheelhouse=$out wheels=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l) python=$pyver" >&2
echo "wheelhouse_changed=$changed"
echo "$out"
