#!/usr/bin/env bash
# End-to-end test of a customer host's first boot: the bundle, the
# cloud-init template, the systemd units and the agent together, in a
# Debian bookworm container booted with systemd-nspawn.
#
# Usage: e2e/run.sh [SCENARIO...]   (as root; `make e2e` runs it)
#
# Scenarios, in the order they run (default: all):
#   first-install             empty bucket: the gate opens at once, the host
#                             registers, the first backup creates latest
#   replacement-host          the bucket has a snapshot: it is restored before
#                             the gateway starts, then backed up anew
#   reboot-of-restored-host   the host of replacement-host boots again: no
#                             second restore and no second registration
#   outage-at-boot            the bucket refuses connections: the gate stays
#                             shut until the bucket is back and the restore
#                             is restarted
#   bad-bundle                the bundle's checksum does not match: nothing
#                             is installed
#
# Each scenario prints "PASS <name>" or "FAIL <name>: <reason>", and the
# run ends with "N passed, M failed"; the exit status is 1 when any failed.
#
# Everything the test starts listens on 127.0.0.1: moto_server stores the
# customer's bucket and the fake platform (fake-platform/) serves the
# bundle and POST /vps/register over HTTPS with a test CA. The container
# shares this machine's network namespace, so its PostgreSQL and the
# heartbeat's status endpoint take 127.0.0.1:5432 and 127.0.0.1:7781, which
# must be free. cloud-init reads a NoCloud seed only. Downloads come from
# Debian's mirror (debootstrap, apt-get here and inside the container) and,
# when moto_server is missing or older than 5.2.5, from PyPI.
#
# Files: build/e2e/rootfs-<key>/ caches the root file system between runs,
# build/e2e/logs/<scenario>/ keeps each scenario's console, journal and
# request logs with the customer's secrets redacted, and build/e2e/run/
# contains the containers' copies while they run. E2E_KEEP=1 keeps those
# copies for inspection.
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(dirname "$E2E_DIR")
E2E_BUILD=$REPO/build/e2e
E2E_LOGS=$E2E_BUILD/logs
E2E_RUN=$E2E_BUILD/run
E2E_TLS=$E2E_RUN/tls
E2E_KNOWN=$E2E_RUN/known-database
TEMPLATE=$REPO/cloud-init/user-data.yaml.tmpl
BUNDLE_DIR=$REPO/dist
# A debug build: `make test` has built it already, and it builds faster
# than a release build when it has not.
FAKE_PLATFORM=${CARGO_TARGET_DIR:-$REPO/target}/debug/matrix-fake-platform
E2E_PYTHON=python3

readonly ALL_SCENARIOS=(first-install replacement-host reboot-of-restored-host
    outage-at-boot bad-bundle)

# shellcheck source=e2e/lib/common.sh
. "$E2E_DIR/lib/common.sh"
# shellcheck source=e2e/lib/host.sh
. "$E2E_DIR/lib/host.sh"
# shellcheck source=e2e/lib/rootfs.sh
. "$E2E_DIR/lib/rootfs.sh"
# shellcheck source=e2e/lib/services.sh
. "$E2E_DIR/lib/services.sh"
# shellcheck source=e2e/lib/customer.sh
. "$E2E_DIR/lib/customer.sh"
# shellcheck source=e2e/lib/container.sh
. "$E2E_DIR/lib/container.sh"
# shellcheck source=e2e/lib/scenarios.sh
. "$E2E_DIR/lib/scenarios.sh"

ROOTFS_JOB=""
PASSED=0
FAILED=0

usage() {
    sed -n '/^# Usage:/,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# Stops everything this run started, whatever state it is in: the
# container, the servers, a root file system build, and any mount left
# under build/e2e.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # Every step runs even when one fails.
    set +e
    stop_container
    stop_platform
    stop_moto
    if [ -n "$ROOTFS_JOB" ]; then
        stop_process "$ROOTFS_JOB" group
    fi
    unmount_under "$E2E_BUILD"
    redact_logs "$E2E_LOGS"
    if [ "${E2E_KEEP:-0}" != 1 ]; then
        remove_tree "$E2E_RUN"
    fi
    exit "$status"
}

# Builds the bundle and the fake platform while the root file system is
# built (or found cached) in the background. Sets ROOTFS and IMAGE_VERSION.
build_everything() {
    setsid "$E2E_DIR/build-rootfs.sh" >"$E2E_RUN/rootfs.path" 2>"$E2E_LOGS/build-rootfs.log" &
    ROOTFS_JOB=$!

    IMAGE_VERSION="matrix-os-host-e2e-$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unversioned)"
    say "building the host bundle $IMAGE_VERSION (log: $E2E_LOGS/bundle.log)"
    IMAGE_VERSION=$IMAGE_VERSION "$REPO/scripts/bundle.sh" >"$E2E_LOGS/bundle.log" 2>&1 ||
        die "scripts/bundle.sh failed; see $E2E_LOGS/bundle.log"
    say "building the fake platform (log: $E2E_LOGS/fake-platform.log)"
    (cd "$REPO" && cargo build --locked -p matrix-fake-platform) \
        >"$E2E_LOGS/fake-platform.log" 2>&1 ||
        die "building matrix-fake-platform failed; see $E2E_LOGS/fake-platform.log"

    if ! wait "$ROOTFS_JOB"; then
        ROOTFS_JOB=""
        cat "$E2E_LOGS/build-rootfs.log" >&2
        die "building the root file system failed"
    fi
    ROOTFS_JOB=""
    cat "$E2E_LOGS/build-rootfs.log" >&2
    ROOTFS=$(tail -n 1 "$E2E_RUN/rootfs.path")
    [ -f "$ROOTFS/.e2e-complete" ] || die "the root file system at '$ROOTFS' is incomplete"
}

# Runs scenario $1 and prints its result line. Stops its container and
# servers afterwards, except that the host and servers of
# replacement-host stay for reboot-of-restored-host when that runs next.
run_scenario() {
    local name=$1 next=${2:-}
    local scenario_function="scenario_${name//-/_}"
    SCENARIO_FAILURE=""
    SCENARIO_LOGS=$E2E_LOGS/$name
    mkdir -p "$SCENARIO_LOGS"
    say "scenario $name: starting"
    local started=$SECONDS

    if "$scenario_function" && [ -z "$SCENARIO_FAILURE" ]; then
        printf 'PASS %s\n' "$name"
        PASSED=$((PASSED + 1))
    else
        printf 'FAIL %s: %s\n' "$name" "${SCENARIO_FAILURE:-the scenario stopped without a reason}"
        FAILED=$((FAILED + 1))
    fi
    say "scenario $name: $((SECONDS - started)) s; logs in $SCENARIO_LOGS"

    save_container_logs
    stop_container
    if [ "$name" = replacement-host ] && [ "$next" = reboot-of-restored-host ]; then
        return
    fi
    stop_platform
    stop_moto
    if [ "${E2E_KEEP:-0}" != 1 ]; then
        remove_tree "$E2E_RUN/$name"
        [ "$name" = reboot-of-restored-host ] && remove_tree "$E2E_RUN/replacement-host"
    fi
    return 0
}

# Copies the journal and cloud-init's logs of the running container into
# the scenario's log directory.
save_container_logs() {
    container_running || return 0
    in_container journalctl --no-pager -o short-precise >"$SCENARIO_LOGS/journal.txt" 2>&1 || true
    local file
    for file in cloud-init.log cloud-init-output.log; do
        in_container cat "/var/log/$file" >"$SCENARIO_LOGS/$file" 2>/dev/null || true
    done
}

main() {
    local scenario selected=()
    for scenario in "$@"; do
        case "$scenario" in
            -h | --help)
                usage
                exit 0
                ;;
            first-install | replacement-host | reboot-of-restored-host | outage-at-boot | bad-bundle)
                ;;
            *)
                die "unknown scenario '$scenario'; run e2e/run.sh --help for the list"
                ;;
        esac
    done
    # Keep the documented order whatever order the arguments came in.
    for scenario in "${ALL_SCENARIOS[@]}"; do
        if [ $# -eq 0 ] || printf '%s\n' "$@" | grep -qx "$scenario"; then
            selected+=("$scenario")
        fi
    done
    if printf '%s\n' "${selected[@]}" | grep -qx reboot-of-restored-host &&
        ! printf '%s\n' "${selected[@]}" | grep -qx replacement-host; then
        die "reboot-of-restored-host reboots the host of replacement-host; select both"
    fi

    mkdir -p "$E2E_BUILD"
    rm -rf "$E2E_LOGS"
    mkdir -p "$E2E_LOGS"
    ensure_host_tools
    [ -f "$TEMPLATE" ] || die "the cloud-init template $TEMPLATE is missing"
    # The container shares this machine's network namespace, so its
    # PostgreSQL and the heartbeat's status endpoint take these ports.
    local port
    for port in 5432 7781; do
        if port_open "$port"; then
            die "127.0.0.1:$port is in use; the container needs it. Stop what listens there (ss -ltnp) and run again."
        fi
    done

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    remove_tree "$E2E_RUN"
    mkdir -p "$E2E_RUN"

    local started=$SECONDS
    build_everything
    make_tls_certs "$E2E_TLS"
    if printf '%s\n' "${selected[@]}" | grep -qE '^(replacement-host|outage-at-boot)$'; then
        make_known_database "$E2E_KNOWN"
    fi
    say "set-up took $((SECONDS - started)) s"

    local index
    for index in "${!selected[@]}"; do
        run_scenario "${selected[$index]}" "${selected[$((index + 1))]:-}"
    done

    say "the run took $((SECONDS - started)) s"
    printf '%s passed, %s failed\n' "$PASSED" "$FAILED"
    [ "$FAILED" -eq 0 ]
}

main "$@"
