# shellcheck shell=bash
# One test host: a copy of the cached root file system, seeded for
# cloud-init and booted with systemd-nspawn in the host's network
# namespace, so that it reaches moto and the fake platform on 127.0.0.1.
#
# systemd-nspawn runs with --register=no (this machine's PID 1 need not be
# systemd), so machinectl and `systemd-run --machine` cannot reach the
# container. Commands run inside through nsenter into the namespaces of
# the container's PID 1 instead.

NSPAWN_PID=""
LEADER=""
MACHINE=""
ROOT=""

readonly CONTAINER_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Copies the cached tree to $E2E_RUN/$1/root and seeds it for the current
# customer: NoCloud user data and meta-data, trust in the test CA, the
# stand-in gateway, and a short heartbeat interval. Sets ROOT.
prepare_root() {
    local name=$1
    ROOT="$E2E_RUN/$name/root"
    remove_tree "$E2E_RUN/$name"
    mkdir -p "$E2E_RUN/$name"
    cp -a --reflink=auto "$ROOTFS" "$ROOT"
    rm -f "$ROOT/.e2e-complete"

    local seed="$ROOT/var/lib/cloud/seed/nocloud"
    mkdir -p "$seed"
    chmod 700 "$seed"
    render_user_data "$seed/user-data"
    chmod 600 "$seed/user-data"
    write_meta_data "$seed/meta-data"

    # curl (the bundle download) and the agent (registration) both read
    # this bundle. The copy in /usr/local/share keeps the CA through an
    # update-ca-certificates run.
    cp "$E2E_TLS/ca.pem" "$ROOT/usr/local/share/ca-certificates/matrix-e2e-ca.crt"
    cat "$E2E_TLS/ca.pem" >>"$ROOT/etc/ssl/certs/ca-certificates.crt"

    install_gateway_stand_in "$ROOT"

    # The heartbeat's default interval is 5 minutes; the freshness check of
    # lastSyncAt needs a beat within seconds.
    mkdir -p "$ROOT/etc/systemd/system/matrix-heartbeat.service.d"
    printf '%s\n' '[Service]' 'Environment=MATRIX_HEARTBEAT_INTERVAL=5s' \
        >"$ROOT/etc/systemd/system/matrix-heartbeat.service.d/50-e2e.conf"
}

# Installs a matrix-gateway.service into the tree at $1 that appends the
# UTC time to /var/lib/matrix-e2e/gateway-starts and then sleeps. The user
# data's setup script starts it, as it starts the real gateway. It is not
# enabled, so it does not start at boot on its own.
install_gateway_stand_in() {
    cat >"$1/etc/systemd/system/matrix-gateway.service" <<'UNIT'
[Unit]
Description=Matrix gateway (end-to-end test stand-in)

[Service]
Type=exec
ExecStartPre=/bin/sh -c 'mkdir -p /var/lib/matrix-e2e && date -u +%%Y-%%m-%%dT%%H:%%M:%%S.%%NZ >>/var/lib/matrix-e2e/gateway-starts'
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
UNIT
}

# Boots the tree at ROOT as machine e2e-$1, with the console in $2.
# Returns once the container's PID 1 is known (LEADER).
boot_container() {
    MACHINE="e2e-$1"
    local console=$2
    # setsid makes nspawn a process group leader, which the clean-up kills
    # as a whole. In a non-interactive shell it execs without forking, so
    # $! is nspawn's own PID.
    setsid systemd-nspawn --boot --register=no --keep-unit --link-journal=no \
        --machine="$MACHINE" --directory="$ROOT" --console=read-only \
        </dev/null >>"$console" 2>&1 &
    NSPAWN_PID=$!
    LEADER=""
    if ! wait_until 60 find_leader; then
        tail -n 20 "$console" >&2
        return 1
    fi
}

# Sets LEADER to the child of nspawn that is PID 1 in its own PID
# namespace.
find_leader() {
    kill -0 "$NSPAWN_PID" 2>/dev/null || return 1
    local pid
    for pid in $(pgrep -P "$NSPAWN_PID"); do
        if [ "$(awk '/^NSpid:/ { print $NF }' "/proc/$pid/status" 2>/dev/null)" = 1 ]; then
            LEADER=$pid
            return 0
        fi
    done
    return 1
}

# Runs a command inside the container with a clean environment.
in_container() {
    nsenter --target "$LEADER" --mount --uts --ipc --pid --root --wd -- \
        /usr/bin/env -i PATH="$CONTAINER_PATH" LANG=C.UTF-8 TERM=dumb "$@"
}

# Waits up to $1 seconds for cloud-init to finish, then for the boot to
# settle. Prints cloud-init's final status line, e.g. "status: done".
wait_for_cloud_init() {
    local limit=$1
    wait_until 30 in_container true || return 1
    in_container timeout "$limit" cloud-init status --wait 2>/dev/null |
        grep '^status:' | tail -n 1
    in_container timeout 120 systemctl is-system-running --wait >/dev/null 2>&1 || true
}

container_running() {
    [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null
}

# Shuts the container down: poweroff from inside, then SIGTERM to nspawn,
# then SIGKILL to the container's PID 1 (which ends its PID namespace) and
# nspawn's process group. Unmounts anything left under ROOT.
stop_container() {
    [ -n "$NSPAWN_PID" ] || return 0
    if container_running; then
        in_container systemctl poweroff --no-block >/dev/null 2>&1 || true
        wait_until 90 container_stopped ||
            kill -TERM "$NSPAWN_PID" 2>/dev/null || true
        wait_until 30 container_stopped || {
            say "the container $MACHINE did not stop; killing it"
            [ -n "$LEADER" ] && kill -KILL "$LEADER" 2>/dev/null
            kill -KILL -- "-$NSPAWN_PID" 2>/dev/null
        }
    fi
    wait "$NSPAWN_PID" 2>/dev/null || true
    NSPAWN_PID=""
    LEADER=""
    [ -n "$ROOT" ] && unmount_under "$ROOT"
    rmdir "/run/systemd/nspawn/propagate/$MACHINE" 2>/dev/null || true
}

container_stopped() {
    ! container_running
}
