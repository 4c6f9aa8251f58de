#!/usr/bin/env bash
# Build a Debian vagrant-libvirt box on this machine, from Debian's archive only (debootstrap):
# no box registry, no loop device, no root filesystem from anywhere else.
#
#   usage: scripts/build-vagrant-box.sh [bookworm|trixie]      -> prints the box directory
#   environment: LOGPIPE_BOX_SUITE (bookworm; the argument wins), LOGPIPE_BOX_DISK_GB (8),
#                LOGPIPE_BOX_MIRROR (default: the Debian mirror this machine's apt uses)
#
# The box directory, .cache/vagrant/boxes/<suite>-<inputs hash>/, holds:
#   logpipe-<suite>.box   tar of metadata.json, box.img (qcow2), Vagrantfile, vmlinuz, initrd.img:
#                         `vagrant box add --name local/<suite> <file>`
#   vmlinuz, initrd.img   the guest's kernel and initramfs (also inside the box): the image has no
#                         partition table and no boot loader, so it boots by direct kernel boot,
#                         which the box's own Vagrantfile configures for vagrant-libvirt
#   id_ed25519            the SSH key of user `vagrant` (generated once per machine, kept in
#                         .cache/vagrant/box-key; the box's Vagrantfile points Vagrant at it, so
#                         no well-known key is ever accepted by the VMs)
#   build.log, inputs     debootstrap's output; what the hash covers
#
# The image: Debian minbase + kernel, systemd, udev, sshd, python3, sudo, ifupdown with DHCP on the
# first NIC only (eth0; net.ifnames=0 on the kernel command line) so the addresses Vagrant gives
# the other NICs stick, user `vagrant` with passwordless sudo, SSH host keys made at first boot,
# an empty machine-id (each VM gets its own, and with it its own DHCP lease).
#
# Cached by inputs: this script, the suite, the mirror, the disk size and the public key. The same
# inputs reuse the existing box (nothing is run); anything else builds a new directory. debootstrap
# takes most of the time (~4 min for bookworm on these machines).
set -euo pipefail
. "$(dirname "$0")/versions.sh"

suite=${1:-${LOGPIPE_BOX_SUITE:-bookworm}}
case "$suite" in
  bookworm|trixie) ;;
  *) echo "build-vagrant-box: suite must be bookworm or trixie (got $suite)" >&2; exit 2 ;;
esac
disk_gb=${LOGPIPE_BOX_DISK_GB:-8}
[[ $disk_gb =~ ^[0-9]+$ ]] && (( disk_gb >= 3 )) \
  || { echo "build-vagrant-box: LOGPIPE_BOX_DISK_GB must be a whole number >= 3" >&2; exit 2; }
# The same Debian mirror this machine's apt uses, as scripts/build-base-image.sh does.
mirror=${LOGPIPE_BOX_MIRROR:-$(grep -rhoE '^(URIs:|deb) +http[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
         | awk '{print $2}' | head -n1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}

state="$LOGPIPE_CACHE/vagrant"
key="$state/box-key/id_ed25519"
mkdir -p "$state/boxes" "$(dirname "$key")"
if [ ! -s "$key" ]; then
  ssh-keygen -q -t ed25519 -N '' -C logpipe-vagrant-box -f "$key"
fi

# What the box depends on; its hash names the box directory.
inputs=$(printf 'script %s\nsuite %s\nmirror %s\ndisk_gb %s\nkey %s\n' \
  "$(sha256sum "$0" | cut -d' ' -f1)" "$suite" "$mirror" "$disk_gb" "$(cut -d' ' -f1-2 "$key.pub")")
hash=$(printf '%s' "$inputs" | sha256sum | cut -c1-12)
out="$state/boxes/$suite-$hash"
box="$out/logpipe-$suite.box"
if [ -s "$box" ] && [ -f "$out/.complete" ]; then
  echo "$out"; exit 0
fi

command -v debootstrap >/dev/null && command -v qemu-img >/dev/null && command -v mkfs.ext4 >/dev/null \
  || "$LOGPIPE_TOP/scripts/install-host-packages.sh" "$LOGPIPE_TOP/scripts/host-packages-vagrant.txt"
rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d "$state/boxes/.build.XXXXXX")
# --one-file-system: never into a /proc or /sys debootstrap left mounted after a failure.
trap 'rm -rf --one-file-system "$work"' EXIT
rootfs="$work/rootfs"
printf '%s\n' "$inputs" > "$out/inputs"
began=$(date +%s)

# dbus: Vagrant sets the hostname with hostnamectl. kmod, udev: the kernel's modules (virtio NICs).
# ifupdown + isc-dhcp-client: the DHCP lease of the first NIC and the static addresses Vagrant
# writes to /etc/network/interfaces for the others.
echo "build-vagrant-box: debootstrap $suite from $mirror (log: ${out#"$LOGPIPE_TOP"/}/build.log)" >&2
debootstrap --variant=minbase \
  --include=linux-image-amd64,systemd,systemd-sysv,udev,dbus,kmod,openssh-server,sudo,python3,iproute2,ifupdown,isc-dhcp-client,ca-certificates \
  "$suite" "$rootfs" "$mirror" >"$out/build.log" 2>&1 \
  || { echo "build-vagrant-box: debootstrap failed; see $out/build.log" >&2; exit 1; }
echo "build-vagrant-box: debootstrap done in $(( $(date +%s) - began )) s" >&2

security="http://deb.debian.org/debian-security"
{
  echo "deb $mirror $suite main"
  echo "deb $mirror $suite-updates main"
  echo "deb $security $suite-security main"
} > "$rootfs/etc/apt/sources.list"
echo "/dev/vda / ext4 errors=remount-ro 0 1" > "$rootfs/etc/fstab"
echo "logpipe-box" > "$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tlogpipe-box\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
  > "$rootfs/etc/hosts"
cat > "$rootfs/etc/network/interfaces" <<'EOF'
# The first NIC only (Vagrant's management network): the others get the static addresses Vagrant
# appends below.
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
EOF

# Host keys: none in the image (every VM makes its own at first boot, before sshd starts).
rm -f "$rootfs"/etc/ssh/ssh_host_*
cat > "$rootfs/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate SSH host keys (first boot)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/ssh-host-keys.service \
  "$rootfs/etc/systemd/system/multi-user.target.wants/ssh-host-keys.service"
# Vagrant connects with `UseDNS no`-style speed only if sshd does not resolve clients.
echo "UseDNS no" > "$rootfs/etc/ssh/sshd_config.d/vagrant.conf"
: > "$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id"

chroot "$rootfs" useradd -m -s /bin/bash -U vagrant
echo "vagrant ALL=(ALL) NOPASSWD:ALL" > "$rootfs/etc/sudoers.d/vagrant"
chmod 0440 "$rootfs/etc/sudoers.d/vagrant"
install -d -m 0700 "$rootfs/home/vagrant/.ssh"
install -m 0600 "$key.pub" "$rootfs/home/vagrant/.ssh/authorized_keys"
chroot "$rootfs" chown -R vagrant:vagrant /home/vagrant/.ssh

# Direct kernel boot: the kernel and initramfs leave the image for the host.
cp "$(ls "$rootfs"/boot/vmlinuz-* | sort -V | tail -n1)" "$out/vmlinuz"
cp "$(ls "$rootfs"/boot/initrd.img-* | sort -V | tail -n1)" "$out/initrd.img"
chmod 0644 "$out/vmlinuz" "$out/initrd.img"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*_Packages

# The file system from the directory (mkfs.ext4 -d): no loop device, no mount.
# (mkfs prints "Creating regular file" even with -q: stdout carries only the box directory.)
mkfs.ext4 -q -F -L root -d "$rootfs" "$work/disk.raw" "${disk_gb}G" >>"$out/build.log"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/box.img" >>"$out/build.log"
rm -f "$work/disk.raw"

printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$disk_gb" > "$work/metadata.json"
cp "$out/vmlinuz" "$out/initrd.img" "$work/"
cat > "$work/Vagrantfile" <<'EOF'
# Box Vagrantfile (scripts/build-vagrant-box.sh): the image has no boot loader, so libvirt boots
# the kernel and initramfs shipped next to this file; user vagrant logs in with the box's own key.
box_dir = File.dirname(File.expand_path(__FILE__))
Vagrant.configure("2") do |config|
  config.ssh.private_key_path = File.join(box_dir, "id_ed25519")
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(box_dir, "vmlinuz")
    lv.initrd = File.join(box_dir, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
    lv.disk_bus = "virtio"
  end
end
EOF
install -m 0600 "$key" "$work/id_ed25519"
cp "$key" "$out/id_ed25519"
tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -cf "$box.tmp" metadata.json Vagrantfile box.img vmlinuz initrd.img id_ed25519
mv "$box.tmp" "$box"
touch "$out/.complete"
echo "build-vagrant-box: $box ($(du -m "$box" | cut -f1) MB) in $(( $(date +%s) - began )) s" >&2
echo "$out"
