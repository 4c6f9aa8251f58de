#!/usr/bin/env bash
# Build (once) a systemd-capable Debian base image for Molecule and the lab, without any image
# registry: debootstrap a minimal rootfs, then `docker import` it.
#   usage: scripts/build-base-image.sh [bookworm|trixie]   -> prints the image name
# The rootfs tarball is cached under .cache/images/ so a rebuilt Docker engine imports in seconds.
set -euo pipefail
. "$(dirname "$0")/versions.sh"
suite=${1:-bookworm}
image="logpipe-base:${suite}"
# Bump when the package list changes so stale cached images are rebuilt.
rev=3
tag_label="logpipe.base.rev"
"$LOGPIPE_TOP/scripts/ensure-docker.sh"
if [ "$(docker image inspect -f "{{ index .Config.Labels \"$tag_label\" }}" "$image" 2>/dev/null)" = "$rev" ]; then
  echo "$image"; exit 0
fi
cache="$LOGPIPE_CACHE/images"; mkdir -p "$cache"
tarball="$cache/debian-${suite}-r${rev}.tar"
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || "$LOGPIPE_TOP/scripts/install-host-packages.sh"
  # Use the same Debian mirror this machine's apt uses (containers reach it over http).
  mirror=$(grep -rhoE '^(URIs:|deb) +http[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | awk '{print $2}' | head -n1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  echo "build-base-image: debootstrap $suite from $mirror (about a minute)" >&2
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,sudo,iproute2,procps,ca-certificates,openssh-server,curl,gnupg,unzip,less \
    "$suite" "$rootfs" "$mirror" >"$cache/debootstrap-$suite.log" 2>&1 \
    || { echo "debootstrap failed; see $cache/debootstrap-$suite.log" >&2; exit 1; }
  # Trim what a container must not run and make apt use the same mirror.
  echo "deb $mirror $suite main" > "$rootfs/etc/apt/sources.list"
  rm -f "$rootfs"/etc/ssh/ssh_host_* "$rootfs/etc/machine-id"; touch "$rootfs/etc/machine-id"
  tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
docker import --change "LABEL $tag_label=$rev" --change 'CMD ["/lib/systemd/systemd"]' \
  "$tarball" "$image" >/dev/null
echo "$image"
