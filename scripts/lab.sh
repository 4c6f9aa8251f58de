#!/usr/bin/env bash
# logpipe lab: the multi-host deployment on local systemd containers, reached over SSH like VMs.
#
#   scripts/lab.sh up           start (or reuse) the containers, write the inventory, run site.yml,
#                               trigger the producer once and print units, documents and lag
#   scripts/lab.sh status       units, documents, lag; exits non-zero when something is wrong
#   scripts/lab.sh shell HOST   SSH into a lab host as the lab user (sudo works without password)
#   scripts/lab.sh down         remove the containers, the network and the generated inventory
#
# Each host is a container of the logpipe-base image (scripts/build-base-image.sh) running systemd and
# sshd on the private Docker network `logpipe-lab`, with a fixed address. Ansible connects over SSH
# as user `lab` with become, using a key generated under .cache/lab/. See docs/LAB.md.
#
# Environment:
#   LOGPIPE_LAB_SUBNET      /24 for the lab network (default 172.30.99.0/24)
#   LOGPIPE_LAB_SUITE       Debian suite of the base image: bookworm (default) or trixie
#   LOGPIPE_KIBANA_ARCHIVE  a Kibana .tar.gz on this machine: adds host kibana-1 (otherwise skipped)
#   LOGPIPE_ELASTICSEARCH_ARCHIVE  an Elasticsearch archive to use instead of the integ-test zip
#                           (Kibana needs a full distribution)
#   LOGPIPE_LAB_ANSIBLE_ARGS extra arguments for ansible-playbook (e.g. "-v" or "--diff")
set -euo pipefail
# shellcheck disable=SC1091  # versions.sh (pinned versions, LOGPIPE_TOP/LOGPIPE_CACHE) is checked on its own
. "$(dirname "$0")/versions.sh"

TOP=$LOGPIPE_TOP
NET=logpipe-lab
SUBNET=${LOGPIPE_LAB_SUBNET:-172.30.99.0/24}
SUITE=${LOGPIPE_LAB_SUITE:-bookworm}
STATE=$LOGPIPE_CACHE/lab
KEY=$STATE/id_ed25519
INVENTORY=$TOP/inventories/lab
GENERATED=$INVENTORY/generated/hosts.yml
LABEL=logpipe.lab
LAB_USER=lab
LOGS=$LOGPIPE_CACHE/logs
# Keep Ansible state inside the ignored cache (the Makefile exports the same).
export ANSIBLE_HOME=${ANSIBLE_HOME:-$LOGPIPE_CACHE/ansible/home}
export ANSIBLE_LOCAL_TEMP=${ANSIBLE_LOCAL_TEMP:-$LOGPIPE_CACHE/ansible/tmp}
export PATH="$TOP/.venv/bin:$PATH"

# host | last octet | inventory groups | kafka_node_id ("-" for none)
TOPOLOGY=(
  "kafka-ctl-1|11|kafka_controller|1"
  "kafka-ctl-2|12|kafka_controller|2"
  "kafka-ctl-3|13|kafka_controller|3"
  "kafka-broker-1|14|kafka_broker|101"
  "kafka-broker-2|15|kafka_broker|102"
  "es-1|21|elasticsearch|-"
  "kibana-1|31|kibana|-"
  "logpipe-1|41|logpipe|-"
)
# What `status` expects to be active on each tier.
CONSUMER_INSTANCES=(1 2)

log() { printf '\033[1mlab:\033[0m %s\n' "$*" >&2; }
die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

prefix=${SUBNET%.*}
[[ $SUBNET =~ ^([0-9]+\.){3}0/24$ ]] || die "LOGPIPE_LAB_SUBNET must be a /24 like 172.30.99.0/24 (got $SUBNET)"

# Kibana is in the lab when an archive is given to `up`; later commands follow the generated inventory.
kibana_enabled() {
  [ -n "${LOGPIPE_KIBANA_ARCHIVE:-}" ] && return 0
  [ "$COMMAND" != up ] && grep -q '^        kibana-1:' "$GENERATED" 2>/dev/null
}

# The hosts of this lab, one "name|octet|groups|node_id" per line.
lab_hosts() {
  local row
  for row in "${TOPOLOGY[@]}"; do
    if [[ $row == kibana-1* ]] && ! kibana_enabled; then continue; fi
    echo "$row"
  done
}

host_ip() {
  local row name octet
  while IFS='|' read -r name octet _ _; do
    if [ "$name" = "$1" ]; then echo "$prefix.$octet"; return 0; fi
  done < <(lab_hosts)
  return 1
}

hosts_in_group() {
  local name groups
  while IFS='|' read -r name _ groups _; do
    [[ ,$groups, == *",$1,"* ]] && echo "$name"
  done < <(lab_hosts)
  return 0
}

container() { echo "logpipe-lab-$1"; }

lab_ssh() {
  local host=$1; shift
  local ip; ip=$(host_ip "$host") || die "unknown lab host '$host' (hosts: $(lab_hosts | cut -d'|' -f1 | xargs))"
  ssh -n -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
      -o ConnectTimeout=5 -o BatchMode=yes "$LAB_USER@$ip" "$@"
}

# ---------------------------------------------------------------------------------------------------
# up: containers, SSH, inventory
# ---------------------------------------------------------------------------------------------------

ensure_network() {
  local have
  if have=$(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}' "$NET" 2>/dev/null); then
    [ "$have" = "$SUBNET" ] || die "network $NET exists with subnet $have, not $SUBNET: run 'make lab-down' first"
    return 0
  fi
  log "creating Docker network $NET ($SUBNET)"
  docker network create --subnet "$SUBNET" --label "$LABEL=1" "$NET" >/dev/null \
    || die "could not create network $NET on $SUBNET (overlaps another network? set LOGPIPE_LAB_SUBNET)"
}

# Start (or reuse) one host container with the systemd flags measured in
# the shared notes on Molecule on these machines (privileged mode does not work on these machines).
# /tmp is exec like on a stock Debian host. The roles also work with Docker's noexec default
# (Kafka and Elasticsearch get private temp dirs for the JNI libraries Java unpacks; the per-role
# Molecule scenarios run that way).
ensure_container() {
  local host=$1 ip=$2 image=$3 name state
  name=$(container "$host")
  state=$(docker inspect -f '{{.State.Status}}' "$name" 2>/dev/null || true)
  case "$state" in
    running) return 0 ;;
    "") ;;
    *) log "starting existing container $name ($state)"; docker start "$name" >/dev/null; return 0 ;;
  esac
  log "creating container $name ($ip)"
  docker run -d --name "$name" --hostname "$host" --label "$LABEL=1" \
    --network "$NET" --ip "$ip" --network-alias "$host" \
    --cap-add SYS_ADMIN --cap-add NET_ADMIN --security-opt seccomp=unconfined \
    --cgroupns host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp:exec,mode=1777 \
    --stop-signal SIGRTMIN+3 -e container=docker \
    "$image" /lib/systemd/systemd >/dev/null
}

wait_systemd() {
  local name; name=$(container "$1")
  for _ in $(seq 1 60); do
    case "$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)" in
      running|degraded) return 0 ;;
    esac
    sleep 0.5
  done
  die "systemd in $name did not finish booting within 30 s (docker logs $name)"
}

# Idempotent: host keys, the lab user with passwordless sudo, the lab's public key, sshd running.
provision_ssh() {
  local name; name=$(container "$1")
  docker exec -i -e LAB_USER="$LAB_USER" "$name" /bin/bash -euo pipefail -c '
    pubkey=$(cat)
    [ -s /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -A >/dev/null
    id "$LAB_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$LAB_USER"
    echo "$LAB_USER ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/lab-user
    chmod 0440 /etc/sudoers.d/lab-user
    install -d -m 0700 -o "$LAB_USER" -g "$LAB_USER" "/home/$LAB_USER/.ssh"
    printf "%s\n" "$pubkey" > "/home/$LAB_USER/.ssh/authorized_keys"
    chown "$LAB_USER:$LAB_USER" "/home/$LAB_USER/.ssh/authorized_keys"
    chmod 0600 "/home/$LAB_USER/.ssh/authorized_keys"
    if ! systemctl is-active --quiet ssh; then
      systemctl reset-failed ssh 2>/dev/null || true
      systemctl enable --now ssh >/dev/null 2>&1
    fi
  ' < "$KEY.pub"
}

wait_ssh() {
  for _ in $(seq 1 30); do
    lab_ssh "$1" true 2>/dev/null && return 0
    sleep 0.5
  done
  die "cannot SSH to $1 ($(host_ip "$1")) from this machine: is the Docker bridge routed here?"
}

# Artifacts the roles install from this machine (no downloads on the hosts). The logpipe role
# builds its wheelhouse on this machine itself (scripts/build-wheelhouse.sh).
ARTIFACT_KAFKA_DIR=""
ARTIFACT_ES_ZIP=""
fetch_artifacts() {
  ARTIFACT_KAFKA_DIR=$("$TOP/scripts/fetch-kafka.sh")
  if [ -n "${LOGPIPE_ELASTICSEARCH_ARCHIVE:-}" ]; then
    [ -s "$LOGPIPE_ELASTICSEARCH_ARCHIVE" ] || die "LOGPIPE_ELASTICSEARCH_ARCHIVE=$LOGPIPE_ELASTICSEARCH_ARCHIVE is not a file"
    ARTIFACT_ES_ZIP=$LOGPIPE_ELASTICSEARCH_ARCHIVE
  else
    ARTIFACT_ES_ZIP=$("$TOP/scripts/fetch-elasticsearch.sh")
  fi
}

write_inventory() {
  local name octet groups node group first
  mkdir -p "$(dirname "$GENERATED")"
  {
    echo "---"
    echo "# Generated by scripts/lab.sh: do not edit, do not commit (git-ignored). make lab-down removes it."
    echo "# Lab-wide settings are committed next to it in inventories/lab/group_vars/."
    echo "all:"
    echo "  vars:"
    echo "    ansible_user: $LAB_USER"
    echo "    ansible_become: true"
    echo "    ansible_python_interpreter: /usr/bin/python3"
    echo "    ansible_ssh_private_key_file: $KEY"
    echo "    ansible_ssh_common_args: \"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null\""
    echo "    # Lab state on this machine (key, generated Kibana encryption keys)."
    echo "    lab_state_dir: $STATE"
    echo "    # Artifacts on this machine (the lab downloads nothing on its hosts)."
    echo "    lab_kafka_dist_dir: $ARTIFACT_KAFKA_DIR"
    echo "    lab_elasticsearch_zip: $ARTIFACT_ES_ZIP"
    echo "    lab_kibana_archive: \"${LOGPIPE_KIBANA_ARCHIVE:-}\""
    echo "  children:"
    for group in kafka_controller kafka_broker elasticsearch kibana logpipe; do
      echo "    $group:"
      first=1
      while IFS='|' read -r name octet groups node; do
        [[ ,$groups, == *",$group,"* ]] || continue
        [ "$first" = 1 ] && echo "      hosts:"
        first=0
        if [ "$node" = "-" ]; then
          echo "        $name: {ansible_host: $prefix.$octet}"
        else
          echo "        $name: {ansible_host: $prefix.$octet, kafka_node_id: $node}"
        fi
      done < <(lab_hosts)
      if [ "$first" = 1 ]; then
        if [ "$group" = kibana ]; then
          echo "      # empty: no Kibana artifact on this machine (set LOGPIPE_KIBANA_ARCHIVE to add kibana-1)"
        fi
        echo "      hosts: {}"
      fi
    done
  } > "$GENERATED.tmp"
  mv "$GENERATED.tmp" "$GENERATED"
}

run_playbook() {
  local rc=0
  mkdir -p "$LOGS" "$ANSIBLE_HOME" "$ANSIBLE_LOCAL_TEMP"
  log "ansible-playbook -i inventories/lab site.yml (log: ${LOGS#"$TOP"/}/lab-site.log)"
  # shellcheck disable=SC2086  # word splitting of the extra arguments is intended
  (cd "$TOP" && ANSIBLE_FORCE_COLOR=${ANSIBLE_FORCE_COLOR:-$([ -t 1 ] && echo 1 || echo 0)} \
     ANSIBLE_CALLBACKS_ENABLED=ansible.builtin.default,ansible.posix.profile_tasks \
     ansible-playbook -i inventories/lab site.yml ${LOGPIPE_LAB_ANSIBLE_ARGS:-}) 2>&1 \
     | tee "$LOGS/lab-site.log" || rc=$?
  [ "$rc" = 0 ] || die "site.yml failed (rc=$rc); see $LOGS/lab-site.log"
  # PLAY RECAP lines: report how much changed (0 on a warm second run).
  local changed
  changed=$(sed -n 's/\x1b\[[0-9;]*m//g; s/.*changed=\([0-9]*\).*/\1/p' "$LOGS/lab-site.log" \
            | awk '{s+=$1} END {print s+0}')
  log "site.yml finished: changed=$changed"
}

# What this script runs on this machine (Docker, ssh/ssh-keygen, curl, ...): the project's one
# install list, scripts/host-packages.txt (a fresh Debian machine lacks them).
ensure_tools() {
  "$TOP/scripts/install-host-packages.sh"
}

cmd_up() {
  local started name octet image
  started=$(date +%s)
  ensure_tools
  "$TOP/scripts/ensure-docker.sh"
  image=$("$TOP/scripts/build-base-image.sh" "$SUITE")
  mkdir -p "$STATE"
  [ -s "$KEY" ] || { log "generating the lab SSH key ${KEY#"$TOP"/}"; ssh-keygen -q -t ed25519 -N '' -C logpipe-lab -f "$KEY"; }
  if kibana_enabled; then
    [ -s "$LOGPIPE_KIBANA_ARCHIVE" ] || die "LOGPIPE_KIBANA_ARCHIVE=$LOGPIPE_KIBANA_ARCHIVE is not a file"
    log "Kibana: deploying kibana-1 from $LOGPIPE_KIBANA_ARCHIVE"
  else
    log "Kibana: SKIPPED - no Kibana artifact on this machine (Kibana cannot be downloaded here);" \
        "set LOGPIPE_KIBANA_ARCHIVE=/path/to/kibana-<version>-linux-x86_64.tar.gz to deploy kibana-1"
  fi
  ensure_network
  while IFS='|' read -r name octet _ _; do
    ensure_container "$name" "$prefix.$octet" "$image"
  done < <(lab_hosts)
  while IFS='|' read -r name _ _ _; do
    wait_systemd "$name"
    provision_ssh "$name"
    wait_ssh "$name"
  done < <(lab_hosts)
  log "containers up and reachable over SSH in $(( $(date +%s) - started )) s"
  fetch_artifacts
  write_inventory
  run_playbook
  log "deployed in $(( $(date +%s) - started )) s"
  show_summary
  echo
  if ! kibana_enabled; then
    echo "Kibana: skipped (no Kibana artifact on this machine; LOGPIPE_KIBANA_ARCHIVE=... make lab adds kibana-1)"
  fi
  echo "Next:"
  echo "  make lab-status            units, documents, lag (non-zero exit when something is wrong)"
  echo "  make lab-shell HOST=NAME   NAME in: $(lab_hosts | cut -d'|' -f1 | xargs)"
  echo "  make lab-down              remove the lab"
  echo "Bring-up took $(( $(date +%s) - started )) s."
}

# ---------------------------------------------------------------------------------------------------
# observation: units, documents, lag
# ---------------------------------------------------------------------------------------------------

ES_ALIAS=web-logs-topic

es_url() { echo "https://$(host_ip "$(hosts_in_group elasticsearch | head -n1)"):9200"; }

# curl to Elasticsearch as `elastic`, verified against the lab's CA; the password goes to curl on
# stdin (-K -), never on a command line.
es_curl() {
  printf 'user = "elastic:%s"\n' "$(cat "$STATE/secrets/es-elastic" 2>/dev/null)" \
    | curl -K - --cacert "$STATE/pki/ca.crt" "$@"
}

es_count() {
  es_curl -fsS --max-time 5 "$(es_url)/$ES_ALIAS/_count" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])' 2>/dev/null || echo "?"
}

# Units each tier must have active (patterns for systemctl; names come from the roles).
expected_units() {
  local groups=$1 u=()
  [[ ,$groups, == *,kafka_controller,* || ,$groups, == *,kafka_broker,* ]] && u+=("kafka.service")
  [[ ,$groups, == *,elasticsearch,* ]] && u+=("elasticsearch.service")
  [[ ,$groups, == *,kibana,* ]] && u+=("kibana.service")
  if [[ ,$groups, == *,logpipe,* ]]; then
    u+=("logpipe-producer.timer")
    local i; for i in "${CONSUMER_INSTANCES[@]}"; do u+=("logpipe-consumer@$i.service"); done
  fi
  echo "${u[@]}"
}

# Prints "host unit state" rows; returns 1 when a unit is not active or any unit failed.
check_units() {
  local name groups units unit state bad=0 failed
  while IFS='|' read -r name _ groups _; do
    units=$(expected_units "$groups")
    for unit in $units; do
      state=$(lab_ssh "$name" systemctl is-active "$unit" 2>/dev/null || true)
      state=${state:-unreachable}
      printf '  %-15s %-32s %s\n' "$name" "$unit" "$state"
      [ "$state" = active ] || bad=1
    done
    failed=$(lab_ssh "$name" systemctl list-units --state=failed --no-legend --plain 2>/dev/null | awk '{print $1}' | xargs || true)
    if [ -n "$failed" ]; then
      printf '  %-15s %-32s %s\n' "$name" "(failed units)" "$failed"
      bad=1
    fi
  done < <(lab_hosts)
  return "$bad"
}

logpipe_host() { hosts_in_group logpipe | head -n1; }

logpipe_cli() { lab_ssh "$(logpipe_host)" sudo logpipe "$@"; }

# Total consumer lag from `logpipe status --json` ("?" when unknown).
total_lag() {
  local out
  out=$(logpipe_cli status --json 2>/dev/null || true)
  python3 -c 'import json, sys; print(int(json.loads(sys.argv[1])["kafka"]["lag"]))' "$out" 2>/dev/null \
    || echo "?"
}

show_summary() {
  local before after1 after2
  echo
  echo "Hosts and units:"
  check_units || true
  echo
  before=$(es_count)
  log "triggering the producer once (systemctl start logpipe-producer.service on $(logpipe_host))"
  lab_ssh "$(logpipe_host)" sudo systemctl start logpipe-producer.service || log "producer run failed"
  after1=$(es_count); sleep 5; after2=$(es_count)
  echo "Documents in Elasticsearch ($ES_ALIAS): before=$before, after producing: $after1 -> $after2 (5 s later)"
  echo
  echo "Consumer lag (logpipe status on $(logpipe_host)):"
  # stderr carries librdkafka's connection errors when a broker is down: keep the table readable.
  logpipe_cli status 2>/dev/null || echo "  (logpipe status reported an error: make lab-shell HOST=$(logpipe_host), then sudo logpipe status)"
}

cmd_status() {
  [ -s "$GENERATED" ] || die "no lab: run 'make lab' first"
  local problems=() c1 c2 l1 l2
  echo "Hosts and units:"
  check_units || problems+=("a unit is not active or has failed")
  c1=$(es_count); l1=$(total_lag)
  sleep 5
  c2=$(es_count); l2=$(total_lag)
  echo
  echo "Documents in Elasticsearch ($ES_ALIAS): $c1 -> $c2 (5 s apart)"
  echo "Consumer lag (messages): $l1 -> $l2 (5 s apart)"
  if [ "$c2" = "?" ]; then
    problems+=("Elasticsearch does not answer at $(es_url)")
  elif [ "$c2" = 0 ]; then
    problems+=("no documents in Elasticsearch")
  fi
  if [ "$l2" = "?" ]; then
    problems+=("logpipe status failed on $(logpipe_host)")
  elif [ "$l1" != "?" ] && [ "$l2" -gt 0 ] && [ "$l2" -gt "$l1" ]; then
    problems+=("consumer lag is growing ($l1 -> $l2)")
  elif [ "$l2" -gt 0 ] && [ "$c1" = "$c2" ]; then
    problems+=("documents are not arriving: lag $l2 but the count stays at $c2")
  fi
  newest_check || problems+=("no document indexed recently (the timer fires every few minutes)")
  echo
  if [ ${#problems[@]} -gt 0 ]; then
    printf 'lab-status: PROBLEM: %s\n' "${problems[@]}"
    exit 1
  fi
  echo "lab-status: OK"
}

# The newest document must be younger than LOGPIPE_LAB_MAX_AGE seconds (default 600).
newest_check() {
  local age
  age=$(es_curl -fsS --max-time 5 -H 'Content-Type: application/json' \
          "$(es_url)/$ES_ALIAS/_search?size=0" \
          -d '{"aggs":{"newest":{"max":{"field":"indexed_at"}}}}' 2>/dev/null \
        | python3 -c '
import json, sys, time
v = json.load(sys.stdin)["aggregations"]["newest"]["value"]
print(int(time.time() - v / 1000) if v else -1)' 2>/dev/null || echo -1)
  echo "Newest document indexed ${age} s ago"
  [ "$age" -ge 0 ] && [ "$age" -le "${LOGPIPE_LAB_MAX_AGE:-600}" ]
}

cmd_shell() {
  local host=${1:-}
  [ -n "$host" ] || die "usage: make lab-shell HOST=NAME (hosts: $(lab_hosts | cut -d'|' -f1 | xargs))"
  host_ip "$host" >/dev/null || die "unknown lab host '$host' (hosts: $(lab_hosts | cut -d'|' -f1 | xargs))"
  local ip; ip=$(host_ip "$host")
  exec ssh -t -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
      "$LAB_USER@$ip"
}

cmd_down() {
  local ids
  ids=$(docker ps -aq --filter "label=$LABEL=1")
  if [ -n "$ids" ]; then
    log "removing $(echo "$ids" | wc -w) lab containers"
    # shellcheck disable=SC2086
    docker rm -f $ids >/dev/null
  fi
  if docker network inspect "$NET" >/dev/null 2>&1; then
    log "removing network $NET"
    docker network rm "$NET" >/dev/null
  fi
  rm -f "$GENERATED"
  log "lab removed (the base image and .cache/lab/ key are kept)"
}

COMMAND=${1:-}
case "$COMMAND" in
  up) cmd_up ;;
  status) cmd_status ;;
  shell) shift; cmd_shell "${1:-}" ;;
  down) cmd_down ;;
  *) echo "usage: $0 up|status|shell HOST|down" >&2; exit 2 ;;
esac
