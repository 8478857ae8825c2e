#!/usr/bin/env bash
# Runs the matrix-agent benchmark: installs what it needs when missing
# (bench/install-bench-deps.sh) and runs bench/bench.py with the arguments
# given here, which builds the release agent unless MATRIX_AGENT_BIN names
# one. With no arguments it compares the agent with the shell-script
# baseline at BENCH_SCALE MiB (default 1024); with --sweep it runs the
# tuning sweep. bench/bench.py documents the BENCH_* variables.
#
# Examples:
#   bench/run.sh                      # under 10 minutes on 2 cores
#   BENCH_SCALE=256 bench/run.sh      # a quicker, smaller run
#   bench/run.sh --sweep              # the tuning sweep, about 15 minutes
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# BENCH_BUDGET counts from here, so the installs and the build are in it.
BENCH_STARTED=$(date +%s)
export BENCH_STARTED

"$repo/bench/install-bench-deps.sh"
command -v cargo >/dev/null 2>&1 ||
    { echo "bench: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }

# bench.py --build runs cargo while it generates the database.
build=()
if [ -z "${MATRIX_AGENT_BIN:-}" ]; then
    build=(--build)
fi

export BENCH_ENTRY="bench/run.sh"
exec python3 "$repo/bench/bench.py" "${build[@]}" "$@"
