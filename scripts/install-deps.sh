#!/usr/bin/env bash
# Installs what building, testing and the demo need when it is missing:
# the PostgreSQL server (Debian packages postgresql and postgresql-contrib),
# moto_server (PyPI package moto[server]), libfaketime (Debian package of
# that name), and checks that cargo with rustfmt and clippy is on PATH.
#
# Prints one line per install and nothing when everything is present. Exits
# non-zero with a message when an install fails. Runs as root, or through
# sudo when not root. The distribution's own PostgreSQL cluster is neither
# started nor enabled, so nothing listens on port 5432 afterwards.
set -euo pipefail

readonly PG_INSTALL_ROOT=/usr/lib/postgresql
readonly POLICY_RC=/usr/sbin/policy-rc.d
# Where moto goes when the system Python is managed by Debian (PEP 668).
readonly MOTO_VENV=/opt/matrix-dev/moto
# moto 5.2.1 answers CompleteMultipartUpload with a root element the AWS SDK
# rejects; 5.2.5 is the first release the tests were run against.
readonly MOTO_SPEC='moto[server]==5.2.5'
readonly MOTO_MIN_VERSION=5.2.5

say() {
    printf 'install-deps: %s\n' "$*" >&2
}

die() {
    say "$*"
    exit 1
}

is_root() {
    [ "$(id -u)" -eq 0 ]
}

# Runs a command as root: directly when root, else through sudo.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$1' needs root and sudo is not installed; rerun as root"
    fi
}

scratch=$(mktemp -d -t matrix-install-deps.XXXXXX)
policy_rc_created=false

cleanup() {
    if "$policy_rc_created"; then
        as_root rm -f "$POLICY_RC"
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

# Runs a command with its output in a log file, and prints the end of that
# log before failing when the command fails.
run_logged() {
    local what=$1
    shift
    local log="$scratch/command.log"
    if ! "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "$what failed (the output above is the end of its log)"
    fi
}

apt_updated=false

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install $* with this system's package manager"
    if ! "$apt_updated"; then
        run_logged "apt-get update" as_root apt-get update -q
        apt_updated=true
    fi
    run_logged "apt-get install $*" as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}

# Succeeds when a Debian package is installed, or when this is no Debian
# system and only the programs can be checked.
deb_installed() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        return 0
    fi
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Prints the newest PostgreSQL major version that has a server binary.
newest_pg_major() {
    local dir
    for dir in "$PG_INSTALL_ROOT"/*/bin/postgres; do
        [ -x "$dir" ] || continue
        dir=${dir#"$PG_INSTALL_ROOT"/}
        printf '%s\n' "${dir%%/*}"
    done | sort -n | tail -n 1
}

# Prints what the newest installed major lacks of the programs the tests
# and the demo run, the contrib extensions the test fixtures create, and
# the postgres account that tests run as root hand their clusters to.
# Prints nothing when the installation is complete.
postgres_missing() {
    local major program
    major=$(newest_pg_major)
    if [ -z "$major" ]; then
        printf '%s\n' "$PG_INSTALL_ROOT/<major>/bin/postgres"
        return
    fi
    for program in postgres initdb pg_ctl psql pg_dump pg_restore pgbench; do
        if [ ! -x "$PG_INSTALL_ROOT/$major/bin/$program" ]; then
            printf '%s\n' "$PG_INSTALL_ROOT/$major/bin/$program"
        fi
    done
    if [ ! -f "/usr/share/postgresql/$major/extension/pgcrypto.control" ]; then
        printf '%s\n' "the pgcrypto extension of PostgreSQL $major"
    fi
    if ! id postgres >/dev/null 2>&1; then
        printf '%s\n' "the postgres system user"
    fi
}

online_clusters() {
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters --no-header 2>/dev/null | awk '$4 == "online" { print $1, $2 }'
    fi
}

install_postgres() {
    local before version name service_was_installed=false
    say "installing Debian packages postgresql and postgresql-contrib (their cluster service stays stopped)"
    before=$(online_clusters)
    # postgresql-common ships both pg_lsclusters and postgresql.service.
    if command -v pg_lsclusters >/dev/null 2>&1; then
        service_was_installed=true
    fi

    # A policy-rc.d that exits 101 stops maintainer scripts from starting
    # services. An existing one is left as it is.
    if [ ! -e "$POLICY_RC" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >'$POLICY_RC' && chmod 755 '$POLICY_RC'"
        policy_rc_created=true
    fi
    apt_install postgresql postgresql-contrib
    if "$policy_rc_created"; then
        as_root rm -f "$POLICY_RC"
        policy_rc_created=false
    fi

    # An existing policy-rc.d may have let the new cluster start: stop any
    # cluster that was not running before the install.
    while read -r version name; do
        [ -n "$version" ] || continue
        if ! grep -qx "$version $name" <<<"$before"; then
            say "stopping the distribution's PostgreSQL $version/$name cluster that the install started"
            run_logged "pg_ctlcluster $version $name stop" as_root pg_ctlcluster "$version" "$name" stop
        fi
    done <<<"$(online_clusters)"

    # A first install enables postgresql.service, which would start that
    # cluster at the next boot. An operator's earlier choice is left alone.
    if ! "$service_was_installed" && command -v systemctl >/dev/null 2>&1; then
        if ! as_root systemctl disable --quiet postgresql.service >/dev/null 2>&1; then
            say "could not disable postgresql.service; run 'systemctl disable postgresql' to keep it from starting at boot"
        fi
    fi

    local missing
    missing=$(postgres_missing)
    if [ -n "$missing" ]; then
        die "the PostgreSQL packages installed, but these are still missing: $(tr '\n' ' ' <<<"$missing")"
    fi
}

# Prints the moto version behind the moto_server on PATH, read through the
# interpreter in the script's first line (after pyenv's shim, if any).
moto_version() {
    local script interpreter
    script=$(command -v moto_server) || return 1
    if command -v pyenv >/dev/null 2>&1 && [[ $script == */shims/* ]]; then
        script=$(pyenv which moto_server 2>/dev/null) || return 1
    fi
    interpreter=$(head -n 1 "$script" | sed -n 's/^#![[:space:]]*//p')
    [ -n "$interpreter" ] || return 1
    $interpreter -c 'import moto; print(moto.__version__)' 2>/dev/null
}

moto_works() {
    local version
    moto_server --help >/dev/null 2>&1 || return 1
    version=$(moto_version) || return 1
    [ "$(printf '%s\n%s\n' "$MOTO_MIN_VERSION" "$version" | sort -V | head -n 1)" = "$MOTO_MIN_VERSION" ]
}

python_externally_managed() {
    python3 - <<'EOF'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.exists(marker) else 1)
EOF
}

python_site_writable() {
    python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.access(sysconfig.get_path("purelib"), os.W_OK) else 1)'
}

install_moto() {
    say "installing $MOTO_SPEC from PyPI"
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-pip python3-venv
    fi

    if python_externally_managed; then
        # Debian's Python rejects pip installs into its own site-packages,
        # so moto gets a virtual environment and a link on PATH.
        if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
            apt_install python3-venv
        fi
        run_logged "creating $MOTO_VENV" as_root python3 -m venv "$MOTO_VENV"
        run_logged "pip install moto[server]" as_root "$MOTO_VENV/bin/pip" install -q "$MOTO_SPEC"
        as_root ln -sf "$MOTO_VENV/bin/moto_server" /usr/local/bin/moto_server
    else
        if ! python3 -m pip --version >/dev/null 2>&1; then
            run_logged "python3 -m ensurepip" python3 -m ensurepip --upgrade
        fi
        if python_site_writable; then
            run_logged "pip install moto[server]" python3 -m pip install -q "$MOTO_SPEC"
        else
            run_logged "pip install moto[server]" as_root "$(command -v python3)" -m pip install -q "$MOTO_SPEC"
        fi
        # pyenv finds new console scripts only after a rehash.
        if command -v pyenv >/dev/null 2>&1; then
            pyenv rehash
        fi
    fi

    hash -r
    moto_works || die "moto[server] installed, but moto_server does not run from PATH; \
add $(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH"
}

check_cargo() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install the Rust toolchain with rustup and put ~/.cargo/bin on PATH"
    cargo fmt --version >/dev/null 2>&1 ||
        die "cargo fmt not found: run 'rustup component add rustfmt'"
    cargo clippy --version >/dev/null 2>&1 ||
        die "cargo clippy not found: run 'rustup component add clippy'"
}

main() {
    check_cargo

    if [ -n "$(postgres_missing)" ] || ! deb_installed postgresql-contrib; then
        install_postgres
    fi

    if ! moto_works; then
        install_moto
    fi

    # The SIGKILL backup scenario runs the agent under libfaketime, which
    # gives each killed run a snapshot minute of its own.
    if ! deb_installed libfaketime; then
        say "installing Debian package libfaketime"
        apt_install libfaketime
    fi
}

main "$@"
