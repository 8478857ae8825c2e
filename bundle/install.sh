#!/bin/sh
# Installs a Matrix host bundle from the directory this script is in: the
# matrix user, the directories with their owners and modes, the agent
# binary and the systemd units. Run it as root. A second run with the same
# bundle changes nothing.
#
# It never touches the restore marker /opt/matrix/restore-complete, the env
# files in /opt/matrix/env/ or anything inside /var/lib/matrix/; it only
# sets the owners and modes of those two directories.
#
# Usage: install.sh [--root DIR]
#
#   --root DIR  Install under DIR instead of / (or set MATRIX_INSTALL_ROOT).
#               The matrix user is then looked up in, and if missing added
#               to, DIR/etc/passwd and DIR/etc/group (useradd --prefix), so
#               those two files must exist, and files get the numeric ids
#               found there. Units are enabled inside DIR, and the running
#               systemd is left alone.
set -eu

umask 022

user=matrix
root="${MATRIX_INSTALL_ROOT:-/}"

log() {
    echo "install.sh: $*" >&2
}

fail() {
    log "$*"
    exit 1
}

usage() {
    sed -n '/^# Usage:/,/^set -eu/{/^set -eu/d;s/^# \{0,1\}//;p}' "$0"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root)
            [ $# -ge 2 ] || fail "--root needs a directory"
            root="$2"
            shift 2
            ;;
        --root=*)
            root="${1#--root=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            fail "unknown argument '$1'; run install.sh --help"
            ;;
    esac
done

[ "$(id -u)" -eq 0 ] || fail "must run as root to set owners and modes"
[ -d "$root" ] || fail "install root $root is not a directory"
root=$(cd "$root" && pwd -P)
# Paths below are "$prefix/opt/matrix" and so on, with no double slash.
if [ "$root" = / ]; then
    prefix=""
else
    prefix="$root"
fi

bundle_dir=$(cd "$(dirname "$0")" && pwd -P)
manifest="$bundle_dir/MANIFEST"
[ -f "$manifest" ] || fail "no MANIFEST next to install.sh in $bundle_dir"

# Checks every file against the MANIFEST before anything is installed.
if ! (cd "$bundle_dir" && sha256sum --check --strict --quiet MANIFEST); then
    fail "the bundle in $bundle_dir does not match its MANIFEST;" \
        "download and unpack it again"
fi
version=$(sed -n 's/^# version: //p' "$manifest")
log "installing matrix-host-bundle $version into $root"

changes=0
restart_heartbeat=no

changed() {
    log "$*"
    changes=$((changes + 1))
}

# Prints field 3 (the id) of entry $2 in the passwd or group file $1.
id_in_file() {
    awk -F: -v name="$2" '$1 == name { print $3; exit }' "$1"
}

# Creates the matrix system user and its group unless they exist, then sets
# uid and gid. With --root, the user lives in the root's own passwd files.
ensure_user() {
    if [ -z "$prefix" ]; then
        if ! getent passwd "$user" >/dev/null; then
            if getent group "$user" >/dev/null; then
                group_option="--gid $user"
            else
                group_option="--user-group"
            fi
            # shellcheck disable=SC2086 # the option and its value split
            useradd --system $group_option --home-dir /var/lib/matrix \
                --no-create-home --shell /usr/sbin/nologin \
                --comment "Matrix host agent" "$user"
            changed "created the system user $user"
        fi
        uid=$(id -u "$user")
        gid=$(getent group "$user" | cut -d: -f3)
        return
    fi

    for file in passwd group; do
        [ -f "$prefix/etc/$file" ] ||
            fail "$prefix/etc/$file is missing; an install root needs its" \
                "own passwd and group files to hold the $user user"
    done
    if [ -z "$(id_in_file "$prefix/etc/passwd" "$user")" ]; then
        if [ -n "$(id_in_file "$prefix/etc/group" "$user")" ]; then
            group_option="--gid $user"
        else
            group_option="--user-group"
        fi
        # shellcheck disable=SC2086 # the option and its value split
        useradd --prefix "$prefix" --system $group_option \
            --home-dir /var/lib/matrix --no-create-home \
            --shell /usr/sbin/nologin --comment "Matrix host agent" "$user"
        changed "created the system user $user in $prefix/etc/passwd"
    fi
    uid=$(id_in_file "$prefix/etc/passwd" "$user")
    gid=$(id_in_file "$prefix/etc/group" "$user")
}

# Sets owner $2 (uid:gid) and octal mode $3 on $1 unless it has them.
# Modes are written as stat prints them: 1775, 755, 644.
ensure_owner_mode() {
    if [ "$(stat -c '%u:%g %a' "$1")" != "$2 $3" ]; then
        # chown first: it clears set-id bits that chmod then sets.
        chown "$2" "$1"
        chmod "$3" "$1"
        changed "set $1 to owner $2, mode $3"
    fi
}

# Creates directory $1 unless it exists, then sets owner $2 and mode $3.
ensure_dir() {
    if [ -L "$1" ]; then
        fail "$1 is a symbolic link; remove it and run install.sh again"
    fi
    if [ ! -d "$1" ]; then
        mkdir -p "$1"
        changed "created $1"
    fi
    ensure_owner_mode "$1" "$2" "$3"
}

# Copies $1 to $2 unless $2 has the same bytes, through a temporary file
# and a rename, so a running program never sees a half-written file. Sets
# owner root:root and mode $3.
ensure_file() {
    if ! cmp -s "$1" "$2"; then
        partial="$2.partial.$$"
        cp "$1" "$partial"
        chown 0:0 "$partial"
        chmod "$3" "$partial"
        mv -f "$partial" "$2"
        changed "installed $2"
        case "$2" in
            */matrix-agent | */matrix-heartbeat.service) restart_heartbeat=yes ;;
        esac
    fi
    ensure_owner_mode "$2" 0:0 "$3"
}

# Creates the system directory $1 (such as /opt) unless it exists. An
# existing one keeps the owner and mode the host gave it.
ensure_parent() {
    if [ ! -d "$1" ]; then
        mkdir -p "$1"
        changed "created $1"
    fi
}

ensure_user

ensure_parent "$prefix/opt"
ensure_parent "$prefix/var/lib"
unit_dir="$prefix/etc/systemd/system"
ensure_parent "$unit_dir"

# /opt/matrix is sticky and group-writable: the agent creates and renames
# the restore marker there, but cannot rename or remove root's bin/ and env/.
ensure_dir "$prefix/opt/matrix" "0:$gid" 1775
ensure_dir "$prefix/opt/matrix/bin" 0:0 755
ensure_dir "$prefix/opt/matrix/env" "0:$gid" 750
ensure_dir "$prefix/var/lib/matrix" "$uid:$gid" 750

# Installs exactly the files the MANIFEST lists, each by its kind.
units=""
while read -r _hash path; do
    case "$path" in
        "" | install.sh)
            ;;
        bin/matrix-agent)
            ensure_file "$bundle_dir/$path" "$prefix/opt/matrix/bin/matrix-agent" 755
            ;;
        units/*.d/*.conf)
            drop_in_dir="$unit_dir/$(basename "$(dirname "$path")")"
            ensure_dir "$drop_in_dir" 0:0 755
            ensure_file "$bundle_dir/$path" "$drop_in_dir/$(basename "$path")" 644
            ;;
        units/*.service | units/*.timer)
            ensure_file "$bundle_dir/$path" "$unit_dir/$(basename "$path")" 644
            units="$units $(basename "$path")"
            ;;
        *)
            fail "MANIFEST lists $path, which install.sh does not know how" \
                "to install"
            ;;
    esac
done <<EOF
$(grep -v '^#' "$manifest")
EOF

# Enables the units that have an [Install] section, so that they start at
# boot; matrix-db-backup.service is started by its timer instead.
for unit in $units; do
    grep -q '^\[Install\]' "$unit_dir/$unit" || continue
    if ! systemctl --root="$root" is-enabled --quiet "$unit"; then
        systemctl --root="$root" enable --quiet "$unit"
        changed "enabled $unit"
    fi
done

# /run/systemd/system exists only while systemd is PID 1 (sd_booted(3)).
if [ -z "$prefix" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$restart_heartbeat" = yes ]; then
        # Only the heartbeat runs for long. A restart of matrix-restore would
        # restart the gateway, which requires it, so it is left alone.
        systemctl try-restart matrix-heartbeat.service
    fi
fi

if [ "$changes" -eq 0 ]; then
    log "matrix-host-bundle $version was already installed; nothing changed"
else
    log "installed matrix-host-bundle $version ($changes changes)"
fi
