#!/usr/bin/env bash
# logpipe lab: the multi-host deployment on local systemd containers, reached over SSH like VMs.
# The topology is the committed inventory inventories/lab/hosts.yml; this script only drives
# the playbooks (see docs/LAB.md):
#
#   scripts/lab.sh up           tools, base image, artifacts; scripts/lab-hosts.yml (network, one
#                               container per host, SSH); site.yml; then scripts/lab-status.yml
#                               after one producer run
#   scripts/lab.sh status       scripts/lab-status.yml: failed or inactive units on every host and
#                               `logpipe check`; exits non-zero when something is wrong
#   scripts/lab.sh shell HOST   SSH into a lab host as the lab user (sudo works without password)
#   scripts/lab.sh down         scripts/lab-hosts.yml -e lab_hosts_state=absent: containers,
#                               network and the generated inventory file
#
# Environment:
#   LOGPIPE_LAB_SUITE       Debian suite of the base image: bookworm (default) or trixie
#   LOGPIPE_KIBANA_ARCHIVE  a Kibana .tar.gz on this machine: kibana-1 is created and deployed
#                           (otherwise skipped)
#   LOGPIPE_ELASTICSEARCH_ARCHIVE  an Elasticsearch archive to use instead of the integ-test zip
#                           (Kibana needs a full distribution)
#   LOGPIPE_LAB_ANSIBLE_ARGS extra arguments for ansible-playbook (e.g. "-v" or "--diff")
set -euo pipefail
# shellcheck disable=SC1091  # versions.sh (pinned versions, LOGPIPE_TOP/LOGPIPE_CACHE) is checked on its own
. "$(dirname "$0")/versions.sh"

TOP=$LOGPIPE_TOP
SUITE=${LOGPIPE_LAB_SUITE:-bookworm}
# The lab's SSH key, CA and passwords (made by the playbooks; kept by `down`).
STATE=$LOGPIPE_CACHE/lab
LOGS=$LOGPIPE_CACHE/logs
# Keep Ansible state inside the ignored cache (the Makefile exports the same).
export ANSIBLE_HOME=${ANSIBLE_HOME:-$LOGPIPE_CACHE/ansible/home}
export ANSIBLE_LOCAL_TEMP=${ANSIBLE_LOCAL_TEMP:-$LOGPIPE_CACHE/ansible/tmp}
export PATH="$TOP/.venv/bin:$PATH"

log() { printf '\033[1mlab:\033[0m %s\n' "$*" >&2; }
die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

# ansible-playbook against the lab inventory; LOGPIPE_LAB_ANSIBLE_ARGS is split into words.
lab_playbook() {
  mkdir -p "$ANSIBLE_HOME" "$ANSIBLE_LOCAL_TEMP"
  # shellcheck disable=SC2086  # word splitting of the extra arguments is intended
  (cd "$TOP" && ansible-playbook -i inventories/lab "$@" ${LOGPIPE_LAB_ANSIBLE_ARGS:-})
}

cmd_up() {
  local started image kafka_dir es_zip limit=all rc=0 changed
  started=$(date +%s)
  # What this script runs on this machine (Docker, ssh/ssh-keygen, ...): the project's one
  # install list, scripts/host-packages.txt (a fresh Debian machine lacks them).
  "$TOP/scripts/install-host-packages.sh"
  "$TOP/scripts/ensure-docker.sh"
  image=$("$TOP/scripts/build-base-image.sh" "$SUITE")
  # Artifacts the roles install from this machine (no downloads on the hosts). The logpipe role
  # builds its wheelhouse on this machine itself (scripts/build-wheelhouse.sh).
  kafka_dir=$("$TOP/scripts/fetch-kafka.sh")
  if [ -n "${LOGPIPE_ELASTICSEARCH_ARCHIVE:-}" ]; then
    [ -s "$LOGPIPE_ELASTICSEARCH_ARCHIVE" ] || die "LOGPIPE_ELASTICSEARCH_ARCHIVE=$LOGPIPE_ELASTICSEARCH_ARCHIVE is not a file"
    es_zip=$LOGPIPE_ELASTICSEARCH_ARCHIVE
  else
    es_zip=$("$TOP/scripts/fetch-elasticsearch.sh")
  fi
  if [ -n "${LOGPIPE_KIBANA_ARCHIVE:-}" ]; then
    [ -s "$LOGPIPE_KIBANA_ARCHIVE" ] || die "LOGPIPE_KIBANA_ARCHIVE=$LOGPIPE_KIBANA_ARCHIVE is not a file"
    log "Kibana: deploying kibana-1 from $LOGPIPE_KIBANA_ARCHIVE"
  else
    limit='all:!kibana'
    log "Kibana: SKIPPED - no Kibana artifact on this machine (Kibana cannot be downloaded here);" \
        "set LOGPIPE_KIBANA_ARCHIVE=/path/to/kibana-<version>-linux-x86_64.tar.gz to deploy kibana-1"
  fi

  log "ansible-playbook -i inventories/lab scripts/lab-hosts.yml"
  lab_playbook scripts/lab-hosts.yml -e "lab_state_dir=$STATE" -e "lab_image=$image" \
    -e "lab_kafka_dist_dir=$kafka_dir" -e "lab_elasticsearch_zip=$es_zip" \
    -e "lab_kibana_archive=${LOGPIPE_KIBANA_ARCHIVE:-}" \
    || die "scripts/lab-hosts.yml failed: the lab's hosts are not up"
  log "containers up and reachable over SSH in $(( $(date +%s) - started )) s"

  mkdir -p "$LOGS"
  log "ansible-playbook -i inventories/lab site.yml --limit '$limit' (log: ${LOGS#"$TOP"/}/lab-site.log)"
  ANSIBLE_FORCE_COLOR=${ANSIBLE_FORCE_COLOR:-$([ -t 1 ] && echo 1 || echo 0)} \
  ANSIBLE_CALLBACKS_ENABLED=ansible.builtin.default,ansible.posix.profile_tasks \
    lab_playbook site.yml --limit "$limit" 2>&1 | tee "$LOGS/lab-site.log" || rc=$?
  [ "$rc" = 0 ] || die "site.yml failed (rc=$rc); see $LOGS/lab-site.log"
  # PLAY RECAP lines: how much changed (0 on a warm second run).
  changed=$(sed -n 's/\x1b\[[0-9;]*m//g; s/.*changed=\([0-9]*\).*/\1/p' "$LOGS/lab-site.log" \
            | awk '{s+=$1} END {print s+0}')
  log "site.yml finished in $(( $(date +%s) - started )) s since start: changed=$changed"

  log "one producer run, then scripts/lab-status.yml"
  lab_playbook scripts/lab-status.yml -e lab_produce=true \
    || die "the lab is up but scripts/lab-status.yml found a problem (above); make lab-status checks again"
  echo
  echo "Next:"
  echo "  make lab-status            units on every host and logpipe check (non-zero exit when something is wrong)"
  echo "  make lab-shell HOST=NAME   NAME: a host of inventories/lab/hosts.yml, e.g. logpipe-1"
  echo "  make lab-down              remove the lab"
  echo "Bring-up took $(( $(date +%s) - started )) s (site.yml changed=$changed)."
}

cmd_status() {
  [ -s "$TOP/inventories/lab/generated/lab.yml" ] || die "no lab: run 'make lab' first"
  ANSIBLE_DISPLAY_SKIPPED_HOSTS=false lab_playbook scripts/lab-status.yml
}

cmd_shell() {
  local host=${1:-} target
  [ -n "$host" ] || die "usage: make lab-shell HOST=NAME (a host of inventories/lab/hosts.yml)"
  # user@address from the inventory (its ansible_user and ansible_host).
  target=$(cd "$TOP" && ansible-inventory -i inventories/lab --host "$host" 2>/dev/null \
           | python3 -c 'import json, sys; h = json.load(sys.stdin); print(f"{h[\"ansible_user\"]}@{h[\"ansible_host\"]}")') \
    || die "'$host' is not a host of inventories/lab/hosts.yml"
  exec ssh -t -i "$STATE/id_ed25519" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
      -o LogLevel=ERROR "$target"
}

cmd_down() {
  "$TOP/scripts/ensure-docker.sh"
  # The plays that set up SSH target the group of hosts being brought up, empty here.
  ANSIBLE_HOST_PATTERN_MISMATCH=ignore lab_playbook scripts/lab-hosts.yml -e lab_hosts_state=absent
  log "lab removed (the base image and ${STATE#"$TOP"/}/ are kept)"
}

COMMAND=${1:-}
case "$COMMAND" in
  up) cmd_up ;;
  status) cmd_status ;;
  shell) shift; cmd_shell "${1:-}" ;;
  down) cmd_down ;;
  *) echo "usage: $0 up|status|shell HOST|down" >&2; exit 2 ;;
esac
