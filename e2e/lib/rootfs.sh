# shellcheck shell=bash
# The cached Debian root file system that every scenario boots a copy of.
#
# debootstrap takes minutes, so the tree is built once and kept under
# build/e2e/rootfs-<key>/. The key is a hash of the suite, the mirror, the
# package list and the text of customize_rootfs, so changing any of them
# builds a new tree (and removes the old one).

readonly ROOTFS_SUITE=bookworm
readonly ROOTFS_MIRROR=${E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Packages debootstrap installs itself. Its own dependency resolver does
# not handle virtual packages (python3-cryptography needs
# python3-cffi-backend-api-min), so the rest goes through apt afterwards.
readonly ROOTFS_BASE_PACKAGES=(systemd systemd-sysv dbus)

# Packages apt installs next. The user data installs PostgreSQL, curl and
# ca-certificates on a real host, and its image has cloud-init. Having them
# here keeps each test boot from downloading them.
readonly ROOTFS_PACKAGES=(
    postgresql cloud-init curl ca-certificates
    iproute2 procps
)

# Prints the cache key of the current package list and customization.
rootfs_key() {
    {
        printf 'suite=%s\nmirror=%s\n' "$ROOTFS_SUITE" "$ROOTFS_MIRROR"
        printf 'base=%s\n' "${ROOTFS_BASE_PACKAGES[@]}"
        printf 'package=%s\n' "${ROOTFS_PACKAGES[@]}"
        declare -f customize_rootfs
    } | sha256sum | cut -c1-16
}

# Adjusts a fresh debootstrap tree for booting under systemd-nspawn with
# the host's network namespace. Runs once per cache key.
customize_rootfs() {
    local root=$1

    # cloud-init reads the NoCloud seed only and never probes a metadata
    # service (169.254.169.254). It must not configure the network either:
    # the container shares the host's network namespace, so a generated
    # DHCP configuration would act on the host's interfaces. Disk resizing
    # is off because the root is a directory, not a partition. The tree has
    # no locales package, so cloud-init's default en_US.UTF-8 would fail
    # its locale module; C.UTF-8 is built into the C library.
    cat >"$root/etc/cloud/cloud.cfg.d/90-matrix-e2e.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
network:
  config: disabled
growpart:
  mode: "off"
resize_rootfs: false
locale: C.UTF-8
CFG

    # A persistent journal, so that a reboot keeps the first boot's log.
    mkdir -p "$root/var/log/journal"

    # An empty machine id makes systemd generate one at the first boot, as
    # on a freshly provisioned image.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"

    # Timers that would run apt or disk maintenance in the middle of a test.
    local unit
    for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
        fstrim.timer e2scrub_reap.service; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
}

# Runs a command in the tree at $1 as in a chroot, through systemd-nspawn
# without booting it: the container's mounts disappear with it, and its
# processes die with the command. It shares the host's network for apt.
run_in_tree() {
    local root=$1
    shift
    systemd-nspawn --quiet --register=no --keep-unit --link-journal=no \
        --directory="$root" --setenv=DEBIAN_FRONTEND=noninteractive "$@"
}

# Builds the tree for the current key unless it is cached. Prints its path.
ensure_rootfs() {
    local key dir partial log
    key=$(rootfs_key)
    dir="$E2E_BUILD/rootfs-$key"
    log="$E2E_LOGS/rootfs.log"
    if [ -f "$dir/.e2e-complete" ]; then
        say "root file system cached: $dir"
        printf '%s\n' "$dir"
        return
    fi

    partial="$dir.partial"
    remove_tree "$partial"
    say "building the $ROOTFS_SUITE root file system (takes minutes; log: $log)"
    local base
    base=$(IFS=,; printf '%s' "${ROOTFS_BASE_PACKAGES[*]}")
    if ! debootstrap --variant=minbase --include="$base" \
        "$ROOTFS_SUITE" "$partial" "$ROOTFS_MIRROR" >"$log" 2>&1; then
        unmount_under "$partial"
        tail -n 20 "$log" >&2
        die "debootstrap failed; the end of $log is above"
    fi
    unmount_under "$partial"

    # policy-rc.d exit status 101 keeps maintainer scripts from starting
    # services, such as PostgreSQL on the host's port 5432.
    printf '#!/bin/sh\nexit 101\n' >"$partial/usr/sbin/policy-rc.d"
    chmod 755 "$partial/usr/sbin/policy-rc.d"
    if ! { run_in_tree "$partial" apt-get update -q &&
        run_in_tree "$partial" apt-get install -y -q --no-install-recommends \
            "${ROOTFS_PACKAGES[@]}" &&
        run_in_tree "$partial" apt-get clean; } >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "installing the packages into the root file system failed; the end of $log is above"
    fi
    rm -f "$partial/usr/sbin/policy-rc.d"
    customize_rootfs "$partial"
    touch "$partial/.e2e-complete"

    # Only one cached tree is kept: each is several hundred MiB.
    local old
    for old in "$E2E_BUILD"/rootfs-*; do
        [ -d "$old" ] && [ "$old" != "$partial" ] && remove_tree "$old"
    done
    mv "$partial" "$dir"
    say "root file system built: $dir"
    printf '%s\n' "$dir"
}
