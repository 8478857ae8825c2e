#!/usr/bin/env bash
# Builds the cached Debian root file system of the end-to-end test, or
# finds it cached, and prints its path. run.sh runs this in the background
# while cargo builds; it can also run on its own to fill the cache.
#
# Usage: e2e/build-rootfs.sh   (as root)
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(dirname "$E2E_DIR")
E2E_BUILD=${E2E_BUILD:-$REPO/build/e2e}
E2E_LOGS=${E2E_LOGS:-$E2E_BUILD/logs}

# shellcheck source=e2e/lib/common.sh
. "$E2E_DIR/lib/common.sh"
# shellcheck source=e2e/lib/rootfs.sh
. "$E2E_DIR/lib/rootfs.sh"

[ "$(id -u)" -eq 0 ] || die "run as root: debootstrap needs it"
mkdir -p "$E2E_BUILD" "$E2E_LOGS"
ensure_rootfs
