# shellcheck shell=bash
# Logging, waiting and clean-up helpers shared by the other files.

say() {
    printf 'e2e: %s\n' "$*" >&2
}

die() {
    say "$*"
    exit 1
}

# Runs "$@" every half second until it succeeds or $1 seconds pass.
# Usage: wait_until SECONDS COMMAND [ARGUMENT...]
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            return 1
        fi
        sleep 0.5
    done
}

# Unmounts every mount point at or below $1 in this mount namespace,
# deepest first.
unmount_under() {
    local base mount_point
    base=$(realpath -m "$1")
    # /proc/self/mountinfo escapes spaces as \040; build paths have none.
    awk '{ print $5 }' /proc/self/mountinfo |
        while read -r mount_point; do
            case "$mount_point" in
                "$base" | "$base"/*) printf '%s\n' "$mount_point" ;;
            esac
        done | sort -r | while read -r mount_point; do
        umount --lazy "$mount_point" 2>/dev/null ||
            say "could not unmount $mount_point"
    done
}

# Removes a directory tree after unmounting anything below it, staying on
# one file system so that a mount left behind is never emptied.
remove_tree() {
    [ -e "$1" ] || return 0
    unmount_under "$1"
    rm -rf --one-file-system "$1"
}

# Prints a TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
    "$E2E_PYTHON" - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
}

# Succeeds when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints $1 random lowercase hex digits.
random_hex() {
    od -An -N"$(( ($1 + 1) / 2 ))" -tx1 /dev/urandom | tr -d ' \n' | cut -c1-"$1"
}

# Stops the process $1 (a process group leader when $2 is "group"): SIGTERM,
# then SIGKILL after 10 seconds.
stop_process() {
    local pid=$1 target=$1
    [ -n "$pid" ] || return 0
    if [ "${2:-}" = group ]; then
        target="-$pid"
    fi
    kill -TERM -- "$target" 2>/dev/null || return 0
    local waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 20 ]; do
        sleep 0.5
        waited=$((waited + 1))
    done
    kill -KILL -- "$target" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
