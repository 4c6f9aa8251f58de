#!/usr/bin/env bash
# Install the Debian packages of scripts/host-packages.txt that are missing (the one list of
# what this machine needs beyond a base Debian system), or of the lists given as arguments
# (scripts/host-packages-vagrant.txt: the VM lab's extras, which CI does not need). Idempotent:
# prints nothing and touches nothing when all are installed. Needs root only when something is
# missing.
#   usage: scripts/install-host-packages.sh [LIST...]
set -euo pipefail
lists=("$@")
[ ${#lists[@]} -gt 0 ] || lists=("$(dirname "$0")/host-packages.txt")
need=()
for list in "${lists[@]}"; do
  while read -r pkg _; do
    case "$pkg" in ''|'#'*) continue ;; esac
    # dpkg -s succeeds for a removed package whose config files remain: ask for the status.
    [ "$(dpkg-query -W -f '${db:Status-Status}' "$pkg" 2>/dev/null || true)" = installed ] || need+=("$pkg")
  done < "$list"
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-host-packages: missing ${need[*]}; as root run: $0 $* (or apt-get install ${need[*]})" >&2
  exit 1
fi
echo "install-host-packages: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
