#!/usr/bin/env bash
# make vagrant-smoke: site.yml on a real VM, booted by Vagrant through the project's Vagrantfile.
#
#   scripts/vagrant-smoke.sh          build (or reuse) the local box, bring up the all-in-one VM of
#                                     inventories/vagrant-smoke with `vagrant up --provider=libvirt`
#                                     (which runs site.yml), prove it, destroy it, tear down
#   scripts/vagrant-smoke.sh check    the checks again, on a VM kept with LOGPIPE_SMOKE_KEEP=1
#   scripts/vagrant-smoke.sh down     tear down what a stopped or kept run left behind
#
# What it proves on the VM, one CHECK line each (exit 1 when any fails):
#   sysctl         roles/common applied vm.max_map_count and vm.swappiness to the running kernel
#   es-bind        Elasticsearch answers on the VM's private address, asked from outside the VM
#   es-bootstrap   it enforced its production bootstrap checks (non-loopback, multi-node discovery)
#                  and runs with the unit's file limit
#   hardening      every unit's systemd-analyze security exposure (logpipe's at most 2.0, as
#                  molecule/logpipe asserts) and the running JVMs and consumer without capabilities
#                  and with no_new_privs
#   flow           with the producer timer stopped: one producer run -> exactly +100 documents,
#                  lag 0, `logpipe check` OK
#   idempotence    a second `vagrant provision` reports changed=0
#
# Where it runs: libvirtd and virtlogd are started here without systemd, inside a network namespace
# made for the smoke run (ip netns), whose only way out is slirp4netns (user-mode NAT: the VM
# reaches Debian's archive, this machine's interfaces and firewall stay untouched). VMs run under
# software emulation (LOGPIPE_VAGRANT_LIBVIRT_DRIVER=qemu) unless LOGPIPE_SMOKE_DRIVER=kvm.
# Needs root (namespaces, libvirtd). Not part of CI: about an hour under emulation (docs/LAB.md).
#
# Environment:
#   LOGPIPE_SMOKE_SUITE       bookworm (default) or trixie: the box's Debian release
#   LOGPIPE_SMOKE_DRIVER      qemu (default: emulation) or kvm
#   LOGPIPE_SMOKE_KEEP        1: leave the VM and libvirtd running after the checks (then `down`)
#   LOGPIPE_PAUSE_FILE        while this file exists, wait before each CPU-heavy step and keep the
#                             VM suspended (a shared machine's "benchmark running" flag)
set -euo pipefail
# shellcheck disable=SC1091  # versions.sh is checked on its own
. "$(dirname "$0")/versions.sh"

TOP=$LOGPIPE_TOP
SUITE=${LOGPIPE_SMOKE_SUITE:-bookworm}
DRIVER=${LOGPIPE_SMOKE_DRIVER:-qemu}
NS=logpipe-vagrant-smoke
HOST=aio-1
STATE=$LOGPIPE_CACHE/vagrant
RUN=$STATE/smoke/run
SECRETS=$STATE/smoke/secrets
LOGS=$LOGPIPE_CACHE/logs
PER_RUN=100

export VAGRANT_HOME=$STATE/home
export VAGRANT_DOTFILE_PATH=$STATE/smoke/dotfile
export VAGRANT_CHECKPOINT_DISABLE=1
export VAGRANT_DEFAULT_PROVIDER=libvirt
export LOGPIPE_VAGRANT_INVENTORY=vagrant-smoke
export LOGPIPE_VAGRANT_LIBVIRT_DRIVER=$DRIVER
export ANSIBLE_HOME=${ANSIBLE_HOME:-$LOGPIPE_CACHE/ansible/home}
export ANSIBLE_LOCAL_TEMP=${ANSIBLE_LOCAL_TEMP:-$LOGPIPE_CACHE/ansible/tmp}
export ANSIBLE_FORCE_COLOR=0
export PATH="$TOP/.venv/bin:$PATH"

log() { printf '\033[1mvagrant-smoke:\033[0m %s\n' "$*" >&2; }
die() { printf 'vagrant-smoke: error: %s\n' "$*" >&2; exit 1; }

pause_point() {
  local file=${LOGPIPE_PAUSE_FILE:-}
  [ -n "$file" ] && [ -e "$file" ] || return 0
  log "waiting: $file exists (next: $1)"
  while [ -e "$file" ]; do sleep 20; done
}

# Vagrant, ssh and curl run in the smoke namespace (libvirt's networks and the VM's addresses live
# only there); virsh reaches libvirtd through its socket from anywhere.
# --no-tty: no progress bars (thousands of "Progress: n%" updates) in the logs.
vagrant_ns() { (cd "$TOP" && ip netns exec "$NS" vagrant --no-tty "$@"); }
vm() { ip netns exec "$NS" ssh -F "$RUN/ssh_config" -o LogLevel=ERROR "$HOST" "$@"; }
lv() { virsh -q -c qemu:///system "$@"; }

# While LOGPIPE_PAUSE_FILE exists, the smoke VMs are suspended (virsh suspend: no CPU at all) and
# resumed once it is gone; runs in the background from libvirtd's start to the teardown. The guest's
# clock stands still meanwhile, and timesyncd steps it afterwards.
pause_watch() {
  local file=$1 name
  while pid_alive "$RUN/libvirtd.pid"; do
    for name in $(lv list --all --name 2>/dev/null); do
      case "$([ -e "$file" ] && echo quiet)-$(lv domstate "$name" 2>/dev/null)" in
        quiet-running) lv suspend "$name" >/dev/null && log "suspended $name ($file exists)" ;;
        -paused) lv resume "$name" >/dev/null && log "resumed $name" ;;
      esac
    done
    sleep 10
  done
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --------------------------------------------------------------------------------------------------
# namespace, slirp4netns, libvirtd
# --------------------------------------------------------------------------------------------------

start_namespace() {
  mkdir -p "$RUN"
  if ! ip netns list | grep -qw "$NS"; then
    log "network namespace $NS"
    ip netns add "$NS"
  fi
  ip -n "$NS" link set lo up
  if ! pid_alive "$RUN/slirp4netns.pid"; then
    # tap0 10.0.2.100/24, gateway 10.0.2.2; --disable-host-loopback: no way to this machine's
    # own 127.0.0.1 services from the namespace.
    nohup slirp4netns --configure --mtu=65520 --disable-host-loopback \
      --netns-type=path "/run/netns/$NS" tap0 >"$RUN/slirp4netns.log" 2>&1 &
    echo $! > "$RUN/slirp4netns.pid"
    for _ in $(seq 1 50); do
      ip -n "$NS" -brief addr show tap0 2>/dev/null | grep -q 10.0.2.100 && break
      sleep 0.2
    done
    ip -n "$NS" -brief addr show tap0 | grep -q 10.0.2.100 || die "slirp4netns did not configure tap0 (see $RUN/slirp4netns.log)"
  fi
}

start_libvirt() {
  if ! pid_alive "$RUN/virtlogd.pid"; then
    ip netns exec "$NS" virtlogd -d -p "$RUN/virtlogd.pid"
  fi
  if ! pid_alive "$RUN/libvirtd.pid"; then
    # Another libvirtd on this machine would share /run/libvirt: refuse rather than fight over it.
    if [ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1; then
      die "a libvirtd not started by this script answers on /run/libvirt/libvirt-sock"
    fi
    ip netns exec "$NS" libvirtd -d -p "$RUN/libvirtd.pid"
  fi
  for _ in $(seq 1 50); do
    lv version >/dev/null 2>&1 && break
    sleep 0.2
  done
  lv version >/dev/null || die "libvirtd does not answer"
  # What existed before this run, so `down` removes only what the run added.
  [ -s "$RUN/networks.before" ] || lv net-list --all --name | sed '/^$/d' > "$RUN/networks.before"
  [ -s "$RUN/pools.before" ] || { lv pool-list --all --name | sed '/^$/d'; echo "#"; } > "$RUN/pools.before"
}

# --------------------------------------------------------------------------------------------------
# teardown: the VM, libvirt's objects, the daemons, the namespace
# --------------------------------------------------------------------------------------------------

stop_pidfile() {
  local file=$1 pid
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  rm -f "$file"
}

cmd_down() {
  local name vol pid left
  stop_pidfile "$RUN/pause-watch.pid"
  if pid_alive "$RUN/libvirtd.pid"; then
    if [ -d "$VAGRANT_DOTFILE_PATH/machines" ]; then
      log "vagrant destroy -f"
      vagrant_ns destroy -f || log "vagrant destroy failed; removing the domains with virsh"
    fi
    for name in $(lv list --all --name); do
      log "removing leftover domain $name"
      lv destroy "$name" >/dev/null 2>&1 || true
      lv undefine "$name" --remove-all-storage >/dev/null 2>&1 || true
    done
    for name in $(lv net-list --all --name); do
      lv net-destroy "$name" >/dev/null 2>&1 || true
      grep -qx "$name" "$RUN/networks.before" 2>/dev/null || lv net-undefine "$name" >/dev/null 2>&1 || true
    done
    # The box's base image that vagrant-libvirt uploaded into the pool, then pools this run added.
    for name in $(lv pool-list --all --name); do
      # (virsh -q: no header lines)
      for vol in $(lv vol-list "$name" 2>/dev/null | awk '/vagrant_box_image/ {print $1}'); do
        lv vol-delete --pool "$name" "$vol" >/dev/null 2>&1 || true
      done
      if ! grep -qx "$name" "$RUN/pools.before" 2>/dev/null; then
        lv pool-destroy "$name" >/dev/null 2>&1 || true
        lv pool-undefine "$name" >/dev/null 2>&1 || true
      fi
    done
  fi
  stop_pidfile "$RUN/libvirtd.pid"
  stop_pidfile "$RUN/virtlogd.pid"
  stop_pidfile "$RUN/slirp4netns.pid"
  if ip netns list | grep -qw "$NS"; then
    # Anything still in the namespace was started by this run (dnsmasq, qemu): end it by PID.
    for pid in $(ip netns pids "$NS"); do
      log "ending leftover process $pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?'))"
      kill "$pid" 2>/dev/null || true
    done
    sleep 1
    for pid in $(ip netns pids "$NS"); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$NS"
  fi
  rm -rf "$VAGRANT_DOTFILE_PATH" "$RUN"
  left=$(pgrep -a -f "qemu-system-x86_64 .*$HOST" || true)
  [ -z "$left" ] || die "still running after teardown: $left"
  log "torn down: no VM, no libvirtd/virtlogd/slirp4netns, no namespace $NS"
}

# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------

RESULTS=()
check() {  # check NAME PASS|FAIL DETAIL
  local line
  line=$(printf 'CHECK %-13s %s  %s' "$1" "$2" "$3")
  RESULTS+=("$line")
  echo "$line"
}

IP=""
es() {  # es PATH [curl args]: Elasticsearch on the VM's private address, from outside the VM
  local path=$1; shift
  printf 'user = "elastic:%s"\n' "$(cat "$SECRETS/es-elastic")" \
    | ip netns exec "$NS" curl -K - -fsS --max-time 20 --cacert "$STATE/smoke/pki/ca.crt" "$@" "https://$IP:9200$path"
}
es_count() { es "/web-logs-topic/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'; }
lag() {
  vm sudo logpipe status --json 2>/dev/null \
    | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["kafka"]["lag"]))' 2>/dev/null || echo "?"
}

# PLAY RECAP of a log: the sum of changed= over all hosts.
recap_changed() {
  sed -n 's/.*: ok=[0-9]* *changed=\([0-9]*\).*/\1/p' "$1" | awk '{s+=$1} END {print s+0}'
}
recap_failed() {
  sed -n 's/.* failed=\([0-9]*\).*/\1/p' "$1" | awk '{s+=$1} END {print s+0}'
}

check_sysctl() {
  local mmc swp
  mmc=$(vm cat /proc/sys/vm/max_map_count); swp=$(vm cat /proc/sys/vm/swappiness)
  if [ "$mmc" = 262144 ] && [ "$swp" = 1 ]; then
    check sysctl PASS "vm.max_map_count=$mmc vm.swappiness=$swp (running kernel, from /etc/sysctl.d/60-logpipe.conf)"
  else
    check sysctl FAIL "vm.max_map_count=$mmc (want 262144) vm.swappiness=$swp (want 1)"
  fi
}

check_es() {
  local http listen boot fds
  http=$(es "/_nodes/_local/http?filter_path=nodes.*.http.publish_address" \
         | python3 -c 'import json,sys; print(*[n["http"]["publish_address"] for n in json.load(sys.stdin)["nodes"].values()])' 2>&1 || true)
  listen=$(vm sudo ss -Hltn 'sport = :9200' | awk '{print $4}' | sort | xargs)
  if [[ $http == *"$IP:9200"* ]]; then
    check es-bind PASS "https://$IP:9200 answers from outside the VM; publish_address $http; listening on $listen"
  else
    check es-bind FAIL "publish_address '$http'; listening on '$listen'"
  fi
  # One string: ssh joins its arguments with spaces, so the pattern's quotes must reach the VM's
  # shell (as separate arguments, grep searched for "bound" alone).
  boot=$(vm "sudo grep -rhoE 'bound or publishing to a non-loopback address, enforcing bootstrap checks' /var/log/elasticsearch/ | head -n1" || true)
  fds=$(es "/_nodes/_local/stats/process?filter_path=nodes.*.process.max_file_descriptors" \
        | python3 -c 'import json,sys; print(*[n["process"]["max_file_descriptors"] for n in json.load(sys.stdin)["nodes"].values()])' 2>/dev/null || echo "?")
  if [ -n "$boot" ] && [ "$fds" = 65535 ]; then
    check es-bootstrap PASS "log: \"$boot\"; max_file_descriptors=$fds; started, so every bootstrap check passed"
  else
    check es-bootstrap FAIL "bootstrap-check log line: '${boot:-none}'; max_file_descriptors=$fds"
  fi
}

check_hardening() {
  local unit score scores=() bad=() pid status name
  for unit in kafka.service elasticsearch.service logpipe-consumer@1.service logpipe-producer.service \
              logpipe-check.service logpipe-prune.service; do
    score=$(vm sudo systemd-analyze security --no-pager "$unit" 2>/dev/null \
            | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \(.*\)/\1 \2/p')
    scores+=("$unit=${score:-?}")
    case "$unit" in
      logpipe-*) awk -v s="${score%% *}" 'BEGIN {exit !(s != "" && s + 0 <= 2.0)}' || bad+=("$unit exposure ${score:-?} > 2.0") ;;
    esac
  done
  for unit in kafka.service elasticsearch.service logpipe-consumer@1.service; do
    pid=$(vm systemctl show -P MainPID "$unit")
    status=$(vm sudo cat "/proc/$pid/status" 2>/dev/null || true)
    name=${unit%.service}
    grep -Eq '^NoNewPrivs:\s+1' <<<"$status" || bad+=("$name: no_new_privs not set")
    grep -Eq '^CapEff:\s+0+$' <<<"$status" || bad+=("$name: effective capabilities")
  done
  if [ ${#bad[@]} -eq 0 ]; then
    check hardening PASS "exposure ${scores[*]}; kafka, elasticsearch, consumer: NoNewPrivs 1, CapEff 0"
  else
    check hardening FAIL "${bad[*]}; exposure ${scores[*]}"
  fi
}

wait_lag_zero() {
  local l=""
  for _ in $(seq 1 120); do
    l=$(lag); [ "$l" = 0 ] && return 0
    sleep 5
  done
  echo "lag stayed at $l" >&2
  return 1
}

check_flow() {
  local base=0 want now=0 after=0 l check_out rc=0 began
  vm sudo systemctl stop logpipe-producer.timer
  for _ in $(seq 1 60); do
    case "$(vm systemctl show -P ActiveState logpipe-producer.service)" in inactive|failed) break ;; esac
    sleep 2
  done
  wait_lag_zero || { check flow FAIL "the consumer did not catch up before the run (lag $(lag))"; return; }
  base=$(es_count)
  began=$(date +%s)
  vm sudo systemctl start logpipe-producer.service
  want=$((base + PER_RUN))
  for _ in $(seq 1 120); do
    now=$(es_count 2>/dev/null || echo "$now")
    [ "$now" -ge "$want" ] && break
    sleep 5
  done
  wait_lag_zero || true
  sleep 10
  after=$(es_count); l=$(lag)
  check_out=$(vm sudo logpipe check 2>&1) || rc=$?
  vm sudo systemctl start logpipe-producer.timer
  if [ "$after" = "$want" ] && [ "$l" = 0 ] && [ "$rc" = 0 ]; then
    check flow PASS "documents $base -> $after (+$PER_RUN exactly, $(( $(date +%s) - began )) s), lag 0; logpipe check: $check_out"
  else
    check flow FAIL "documents $base -> $after (want $want), lag $l; logpipe check rc=$rc: $check_out"
  fi
}

# --------------------------------------------------------------------------------------------------

T=()
LAP=0
lap_start() { LAP=$(date +%s); }
lap() { T+=("$(printf '%-28s %5d s' "$1" $(( $(date +%s) - LAP )))"); }

provision_log() {  # provision_log LOG vagrant-args...
  local out=$1 rc=0; shift
  vagrant_ns "$@" 2>&1 | tee "$out" || rc=$?
  return "$rc"
}

cmd_run() {
  local began box_dir box_name changed failed rc=0
  began=$(date +%s)
  [ "$(id -u)" = 0 ] || die "needs root (network namespace, libvirtd)"
  "$TOP/scripts/install-host-packages.sh" "$TOP/scripts/host-packages.txt" "$TOP/scripts/host-packages-vagrant.txt"
  "$TOP/scripts/fetch-kafka.sh" >/dev/null
  "$TOP/scripts/fetch-elasticsearch.sh" >/dev/null
  mkdir -p "$LOGS"

  pause_point "building the box"
  lap_start
  box_dir=$("$TOP/scripts/build-vagrant-box.sh" "$SUITE") || die "box build failed"
  lap "box build (or cache)"
  # The box's name carries its input hash: a changed box is a new name, never a stale one.
  box_name="local/logpipe-$(basename "$box_dir")"
  export LOGPIPE_VAGRANT_BOX=$box_name
  if ! vagrant box list 2>/dev/null | grep -q "^$box_name "; then
    lap_start
    vagrant --no-tty box add --name "$box_name" "$box_dir/logpipe-$SUITE.box"
    lap "vagrant box add"
  fi

  trap 'rc=$?; if [ "${LOGPIPE_SMOKE_KEEP:-0}" = 1 ]; then log "kept (LOGPIPE_SMOKE_KEEP=1): scripts/vagrant-smoke.sh down removes it"; else cmd_down; fi; exit $rc' EXIT
  start_namespace
  start_libvirt
  echo "$box_name" > "$RUN/box"
  if [ -n "${LOGPIPE_PAUSE_FILE:-}" ] && ! pid_alive "$RUN/pause-watch.pid"; then
    pause_watch "$LOGPIPE_PAUSE_FILE" &
    echo $! > "$RUN/pause-watch.pid"
  fi

  pause_point "vagrant up"
  log "vagrant up --provider=libvirt (boot + site.yml; log: ${LOGS#"$TOP"/}/vagrant-smoke-up.log)"
  lap_start
  provision_log "$LOGS/vagrant-smoke-up.log" up --provider=libvirt \
    || die "vagrant up failed (see $LOGS/vagrant-smoke-up.log)"
  lap "vagrant up (boot + site.yml)"
  changed=$(recap_changed "$LOGS/vagrant-smoke-up.log")
  log "site.yml (first run): changed=$changed"
  vm_address

  lap_start
  run_checks
  lap "checks"

  pause_point "second provision"
  log "vagrant provision (second site.yml run; log: ${LOGS#"$TOP"/}/vagrant-smoke-provision.log)"
  lap_start
  if provision_log "$LOGS/vagrant-smoke-provision.log" provision "$HOST"; then
    lap "vagrant provision (2nd run)"
    changed=$(recap_changed "$LOGS/vagrant-smoke-provision.log"); failed=$(recap_failed "$LOGS/vagrant-smoke-provision.log")
    if [ "$changed" = 0 ] && [ "$failed" = 0 ]; then
      check idempotence PASS "second site.yml: $(grep -E '^[a-z0-9-]+ +: ok=' "$LOGS/vagrant-smoke-provision.log" | tr -s ' ')"
    else
      check idempotence FAIL "second site.yml: changed=$changed failed=$failed (see $LOGS/vagrant-smoke-provision.log)"
    fi
  else
    check idempotence FAIL "vagrant provision failed (see $LOGS/vagrant-smoke-provision.log)"
  fi

  if [ "${LOGPIPE_SMOKE_KEEP:-0}" != 1 ]; then
    trap - EXIT
    lap_start
    cmd_down
    lap "vagrant destroy + teardown"
  fi
  echo
  echo "Checks:"; printf '  %s\n' "${RESULTS[@]}"
  echo "Times:"; printf '  %s\n' "${T[@]}"
  echo "  total                        $(printf '%5d' $(( $(date +%s) - began ))) s"
  printf '%s\n' "${RESULTS[@]}" | grep -q '^CHECK [a-z-]* *FAIL' && rc=1
  [ "$rc" = 0 ] && echo "vagrant-smoke: OK" || echo "vagrant-smoke: FAILED"
  return "$rc"
}

# Each check reports FAIL on its own (an unreachable VM gives empty values), and the next one runs:
# errexit does not apply inside a function called on the left of ||.
run_checks() {
  check_sysctl || true
  check_es || true
  check_hardening || true
  check_flow || true
}

# The VM's private address, as the Vagrantfile took it from the inventory (and it stuck on eth1).
vm_address() {
  vagrant_ns ssh-config "$HOST" > "$RUN/ssh_config"
  IP=$(vm ip -4 -o addr show eth1 | awk '{print $4}' | cut -d/ -f1)
  grep -q "ansible_host: $IP\$" "$TOP/inventories/vagrant-smoke/hosts.yml" \
    || die "eth1 has '$IP', not the inventory's ansible_host (the private network's address did not stick)"
}

cmd_check() {  # the checks again, on a VM kept with LOGPIPE_SMOKE_KEEP=1
  pid_alive "$RUN/libvirtd.pid" || die "no smoke VM (run with LOGPIPE_SMOKE_KEEP=1 first)"
  LOGPIPE_VAGRANT_BOX=$(cat "$RUN/box")
  export LOGPIPE_VAGRANT_BOX
  vm_address
  run_checks
  printf '%s\n' "${RESULTS[@]}" | grep -q '^CHECK [a-z-]* *FAIL' && return 1
  return 0
}

case "${1:-run}" in
  run) cmd_run ;;
  check) cmd_check ;;
  down) cmd_down ;;
  *) echo "usage: $0 [run|check|down]" >&2; exit 2 ;;
esac
