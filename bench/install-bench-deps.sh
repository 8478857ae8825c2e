#!/usr/bin/env bash
# Installs what bench/bench.py needs when it is missing or too old:
#   - GNU time at /usr/bin/time (Debian package time), for `time -v`;
#   - the PostgreSQL server programs and the postgres account (Debian
#     packages postgresql and postgresql-contrib); their cluster service is
#     neither started nor enabled;
#   - the AWS CLI (PyPI package awscli, at least 1.37, whose botocore
#     honours AWS_REQUEST_CHECKSUM_CALCULATION), unless an AWS CLI v2 is on
#     PATH;
#   - moto_server (PyPI package moto[server]==5.2.5, because 5.2.1 breaks
#     CompleteMultipartUpload), replacing any moto older than 5.2.5.
#
# A Python package goes into the interpreter that already runs the old
# program; a new one goes into python3 unless Debian manages that Python
# (PEP 668), in which case it goes into the virtual environment
# /opt/matrix-dev/bench with links in /usr/local/bin. Prints one line per
# install and nothing when everything is present. Runs as root, or through
# sudo when not root.
set -euo pipefail

readonly PG_INSTALL_ROOT=/usr/lib/postgresql
readonly POLICY_RC=/usr/sbin/policy-rc.d
readonly BENCH_VENV=/opt/matrix-dev/bench
readonly MOTO_REQUIREMENT='moto[server]==5.2.5'
readonly MOTO_MINIMUM=5.2.5
readonly AWSCLI_REQUIREMENT='awscli>=1.37'
# botocore 1.36 is the first to honour AWS_REQUEST_CHECKSUM_CALCULATION.
readonly BOTOCORE_MINIMUM=1.36

say() {
    printf 'install-bench-deps: %s\n' "$*" >&2
}

die() {
    say "$*"
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$1' needs root and sudo is not installed; rerun as root"
    fi
}

scratch=$(mktemp -d -t matrix-bench-deps.XXXXXX)
policy_rc_created=false

cleanup() {
    if "$policy_rc_created"; then
        as_root rm -f "$POLICY_RC"
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

# Runs a command with its output in a log, printing the log's end on failure.
run_logged() {
    local what=$1
    shift
    if ! "$@" >"$scratch/command.log" 2>&1; then
        tail -n 30 "$scratch/command.log" >&2
        die "$what failed (the output above is the end of its log)"
    fi
}

# Succeeds when version $1 is at least version $2 (dotted numbers).
version_at_least() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
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

# --- Debian packages ---------------------------------------------------------

postgres_complete() {
    local bin program
    for bin in "$PG_INSTALL_ROOT"/*/bin; do
        for program in postgres initdb pg_ctl psql pg_dump pg_restore pgbench; do
            [ -x "$bin/$program" ] || continue 2
        done
        id postgres >/dev/null 2>&1 && return 0
    done
    return 1
}

install_postgres() {
    say "installing Debian packages postgresql and postgresql-contrib (their cluster service stays stopped)"
    # A policy-rc.d that exits 101 keeps the packages from starting their
    # cluster. An existing one is left as it is.
    if [ ! -e "$POLICY_RC" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >'$POLICY_RC' && chmod 755 '$POLICY_RC'"
        policy_rc_created=true
    fi
    apt_install postgresql postgresql-contrib
    if "$policy_rc_created"; then
        as_root rm -f "$POLICY_RC"
        policy_rc_created=false
    fi
    if command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --quiet postgresql.service >/dev/null 2>&1 ||
            say "could not disable postgresql.service; run 'systemctl disable postgresql'"
    fi
    postgres_complete ||
        die "the PostgreSQL packages installed, but $PG_INSTALL_ROOT/<major>/bin lacks a program the benchmark runs"
}

# --- Python packages ---------------------------------------------------------

# Prints the interpreter that runs the Python console script $1 on PATH,
# read from its shebang line (through pyenv's shim when there is one).
script_interpreter() {
    local script first
    script=$(command -v "$1") || return 1
    if command -v pyenv >/dev/null 2>&1 && grep -q pyenv "$script" 2>/dev/null; then
        script=$(pyenv which "$1" 2>/dev/null) || return 1
    fi
    first=$(head -n 1 "$script")
    case $first in
    '#!'*python*) printf '%s\n' "${first#\#!}" ;;
    *) return 1 ;;
    esac
}

# Prints the version of Python package $1 installed for the interpreter
# that runs console script $2.
package_version() {
    local interpreter
    interpreter=$(script_interpreter "$2") || return 1
    # shellcheck disable=SC2086 # a shebang line may carry arguments
    $interpreter -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null
}

python_externally_managed() {
    python3 -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'
}

# Installs requirement $1, which provides console script $2, into a Python
# where the script will be found on PATH.
pip_install_new() {
    local requirement=$1 script=$2
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-pip python3-venv
    if python_externally_managed; then
        python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
        [ -x "$BENCH_VENV/bin/python" ] ||
            run_logged "creating $BENCH_VENV" as_root python3 -m venv "$BENCH_VENV"
        run_logged "pip install $requirement" as_root "$BENCH_VENV/bin/pip" install -q "$requirement"
        as_root ln -sf "$BENCH_VENV/bin/$script" "/usr/local/bin/$script"
    else
        python3 -m pip --version >/dev/null 2>&1 ||
            run_logged "python3 -m ensurepip" as_root python3 -m ensurepip --upgrade
        run_logged "pip install $requirement" as_root "$(command -v python3)" -m pip install -q "$requirement"
        if command -v pyenv >/dev/null 2>&1; then
            pyenv rehash
        fi
    fi
    hash -r
}

# Installs requirement $1 for console script $2: into the interpreter that
# runs the script now, or as a new install when there is none.
pip_install_for() {
    local requirement=$1 script=$2 interpreter
    if interpreter=$(script_interpreter "$script"); then
        # shellcheck disable=SC2086 # a shebang line may carry arguments
        run_logged "pip install $requirement" as_root $interpreter -m pip install -q "$requirement"
        hash -r
    else
        pip_install_new "$requirement" "$script"
    fi
}

moto_recent() {
    local version
    version=$(package_version moto moto_server) || return 1
    version_at_least "$version" "$MOTO_MINIMUM"
}

ensure_moto() {
    if moto_recent; then
        return 0
    fi
    local found
    found=$(package_version moto moto_server || true)
    say "installing $MOTO_REQUIREMENT from PyPI${found:+ (moto_server runs moto $found)}"
    pip_install_for "$MOTO_REQUIREMENT" moto_server
    if ! moto_recent; then
        die "moto_server on PATH ($(command -v moto_server || echo none)) still runs moto \
$(package_version moto moto_server || echo unknown); put the new install first on PATH"
    fi
}

# Prints botocore's version for a Python AWS CLI, "v2" for AWS CLI v2.
aws_botocore_version() {
    local banner
    banner=$(aws --version 2>&1) || return 1
    case $banner in
    aws-cli/2.*) echo v2 ;;
    *botocore/*) banner=${banner##*botocore/} && echo "${banner%% *}" ;;
    *) return 1 ;;
    esac
}

aws_recent() {
    local version
    version=$(aws_botocore_version) || return 1
    [ "$version" = v2 ] || version_at_least "$version" "$BOTOCORE_MINIMUM"
}

ensure_aws() {
    if aws_recent; then
        return 0
    fi
    local found
    found=$(aws_botocore_version || true)
    say "installing $AWSCLI_REQUIREMENT from PyPI${found:+ (aws runs botocore $found)}"
    pip_install_for "$AWSCLI_REQUIREMENT" aws
    if ! aws_recent; then
        die "aws on PATH ($(command -v aws || echo none)) still runs botocore \
$(aws_botocore_version || echo unknown); put the new install first on PATH"
    fi
}

main() {
    [ -x /usr/bin/time ] || {
        say "installing Debian package time"
        apt_install time
    }
    postgres_complete || install_postgres
    ensure_aws
    ensure_moto
}

main "$@"
