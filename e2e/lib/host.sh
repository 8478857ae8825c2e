# shellcheck shell=bash
# What the test needs on this machine, installed when missing: Debian's
# systemd-container (systemd-nspawn), debootstrap and openssl, and
# moto_server 5.2.5 or newer (5.2.5 fixed CompleteMultipartUpload).

readonly MOTO_MINIMUM=5.2.5
# Where moto goes when the system Python rejects pip installs (PEP 668).
readonly MOTO_VENV=/opt/matrix-dev/moto

apt_updated=false

# Another apt-get or dpkg run, such as a parallel `make test` installing
# its tools, may hold the dpkg lock. apt-get waits up to 5 minutes for it.
readonly APT_LOCK_WAIT=(-o DPkg::Lock::Timeout=300)

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install $* with this system's package manager"
    if ! "$apt_updated"; then
        apt-get "${APT_LOCK_WAIT[@]}" update -q >"$E2E_LOGS/apt.log" 2>&1 || die "apt-get update failed; see $E2E_LOGS/apt.log"
        apt_updated=true
    fi
    say "installing the Debian packages $*"
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_LOCK_WAIT[@]}" install -y -q --no-install-recommends "$@" \
        >>"$E2E_LOGS/apt.log" 2>&1 || die "apt-get install $* failed; see $E2E_LOGS/apt.log"
}

# Prints the Python interpreter that runs moto_server, so that the test's
# boto3 client comes from the same installation.
moto_python() {
    local launcher interpreter
    launcher=$(command -v moto_server) || return 1
    interpreter=$(head -n 1 "$launcher" | sed -n 's/^#! *\([^ ]*python[^ ]*\).*/\1/p')
    if [ -z "$interpreter" ]; then
        interpreter=python3
    fi
    "$interpreter" -c 'import boto3, moto' 2>/dev/null || return 1
    printf '%s\n' "$interpreter"
}

# Succeeds when Python $1 has moto $MOTO_MINIMUM or newer.
moto_recent() {
    "$1" - "$MOTO_MINIMUM" <<'PY'
import re, sys
import moto

def release(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])

sys.exit(0 if release(moto.__version__) >= release(sys.argv[1]) else 1)
PY
}

install_moto() {
    say "installing moto[server]==$MOTO_MINIMUM from PyPI"
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    if python3 -c 'import os, sysconfig, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
        python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
        python3 -m venv "$MOTO_VENV" >>"$E2E_LOGS/pip.log" 2>&1 ||
            die "creating $MOTO_VENV failed; see $E2E_LOGS/pip.log"
        "$MOTO_VENV/bin/pip" install -q "moto[server]==$MOTO_MINIMUM" >>"$E2E_LOGS/pip.log" 2>&1 ||
            die "pip install moto[server] failed; see $E2E_LOGS/pip.log"
        ln -sf "$MOTO_VENV/bin/moto_server" /usr/local/bin/moto_server
    else
        python3 -m pip install -q "moto[server]==$MOTO_MINIMUM" >>"$E2E_LOGS/pip.log" 2>&1 ||
            die "pip install moto[server] failed; see $E2E_LOGS/pip.log"
        # pyenv finds new console scripts only after a rehash.
        if command -v pyenv >/dev/null 2>&1; then
            pyenv rehash
        fi
    fi
    hash -r
}

# Installs what is missing and sets E2E_PYTHON.
ensure_host_tools() {
    [ "$(id -u)" -eq 0 ] ||
        die "run as root: systemd-nspawn and debootstrap need it (sudo make e2e)"
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install the Rust toolchain and put it on PATH"

    local missing=()
    command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
    command -v pgrep >/dev/null 2>&1 || missing+=(procps)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi

    local python=""
    python=$(moto_python) || python=""
    if [ -z "$python" ] || ! moto_recent "$python"; then
        install_moto
        python=$(moto_python) || die "moto_server was installed but does not run with boto3"
        moto_recent "$python" || die "moto_server is still older than $MOTO_MINIMUM after the install"
    fi
    # shellcheck disable=SC2034 # read by the files run.sh sources after this
    E2E_PYTHON=$python
}
