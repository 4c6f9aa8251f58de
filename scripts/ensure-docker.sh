#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io if dockerd is missing and start it
# in the background when it is not running (these machines have no init system managing it).
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
# docker.io (and procps for pgrep) come from the project's install list.
if ! command -v dockerd >/dev/null || ! command -v pgrep >/dev/null; then
  "$(dirname "$0")/install-host-packages.sh"
fi
if ! pgrep -x dockerd >/dev/null; then
  echo "ensure-docker: starting dockerd" >&2
  mkdir -p /var/log
  # Its own session (setsid): dockerd must outlive whatever started it. Started from a job that
  # later ends, it was killed with that job's process group, and every container with it.
  setsid nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "ensure-docker: dockerd did not answer within 60 s; see /var/log/dockerd.log" >&2
exit 1
