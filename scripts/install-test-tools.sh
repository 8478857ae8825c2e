#!/bin/sh
# Installs the Debian packages that the host packaging tests shell out to:
# systemd-analyze and systemctl (systemd), `cloud-init schema` (cloud-init,
# which also brings /usr/bin/python3 with PyYAML), GNU tar, gzip,
# sha256sum, flock, make, git and useradd. Prints nothing when everything
# is present. Needs root, or sudo when not root, to install anything. The
# tests were run against the versions in Debian 12 (systemd 252,
# cloud-init 22.4).
#
# A cloud-init installed here is disabled at boot with
# /etc/cloud/cloud-init.disabled: the tests only need `cloud-init schema`,
# and a development machine must not look for a cloud datasource when it
# next boots.
set -eu

missing=""

# Adds package $2 to the install list unless command $1 is on PATH.
need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        missing="$missing $2"
    fi
}

# Runs a command as root: directly when root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "install-test-tools: installing$missing needs root, and sudo" \
            "is not installed; rerun as root" >&2
        exit 1
    fi
}

need systemd-analyze systemd
need systemctl systemd
need cloud-init cloud-init
need tar tar
need gzip gzip
need sha256sum coreutils
need flock util-linux
need make make
need git git
need useradd passwd

if [ -z "$missing" ]; then
    exit 0
fi

case " $missing " in
    *" cloud-init "*) disable_cloud_init=yes ;;
    *) disable_cloud_init=no ;;
esac

echo "install-test-tools: installing$missing" >&2
# Waits up to 5 minutes for another apt-get or dpkg to release its lock.
lock_wait="-o DPkg::Lock::Timeout=300"
# shellcheck disable=SC2086 # one word per option and package
as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get $lock_wait update -qq >/dev/null
# shellcheck disable=SC2086 # one word per option and package
as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get $lock_wait install -y -qq --no-install-recommends $missing \
    >/dev/null

if [ "$disable_cloud_init" = yes ]; then
    as_root mkdir -p /etc/cloud
    as_root touch /etc/cloud/cloud-init.disabled
fi
