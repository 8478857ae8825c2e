#!/usr/bin/env python3
"""Benchmarks `matrix-agent backup` and `matrix-agent restore` against the
shell-script baseline they replace, and measures the idle heartbeat.

The baseline backup is `pg_dump -Fc -f FILE` then `aws s3 cp FILE s3://...`;
the baseline restore is `aws s3 cp s3://... FILE` then `pg_restore` with one
job into a fresh database. Everything runs on this machine: a throwaway
PostgreSQL cluster, a moto S3 server and a stand-in registration endpoint,
all on 127.0.0.1, in one temporary directory that is removed at the end,
also after a failure or a signal.

Modes:
  bench.py          rounds of agent against baseline at BENCH_SCALE (default
                    1024 MiB), plus the ceilings and the heartbeat
  bench.py --build  either mode, building target/release/matrix-agent with
                    cargo while the database is generated
  bench.py --sweep  the agent alone at BENCH_SCALE (default 256 MiB) under
                    different part sizes, upload concurrencies, dump
                    compression levels and restore jobs

Environment:
  BENCH_SCALE    database size on disk in MiB, half pgbench tables and half
                 random bytea
  BENCH_ROUNDS   rounds in the default mode; by default as many as fit in
                 BENCH_BUDGET, at most 5
  BENCH_BUDGET   seconds the default mode aims to finish in, counted from
                 the start of bench/run.sh, installs and build included
                 (default 570)
  BENCH_REPEATS  runs of each setting in --sweep (default 3)
  BENCH_RESULTS  the Markdown file whose generated sections are rewritten
                 (default bench/results.md); "-" to only print
  BENCH_LOGS     a directory to copy every command's log into at the end
  MATRIX_AGENT_BIN  the agent (default target/release/matrix-agent)
"""

import sys

sys.dont_write_bytecode = True

import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import comparison  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402
from harness import Bench  # noqa: E402
from report import seconds  # noqa: E402
from services import AgentBuild, BenchError, RegistrationServer, Scratch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def env_number(name, default, kind=int):
    """Reads a positive number from the environment; unset or empty gives
    `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise BenchError(f"{name} must be a number, not {text!r}") from None
    if value <= 0:
        raise BenchError(f"{name} must be greater than zero, not {text!r}")
    return value


def invocation():
    """Returns the command line that started this run, with its BENCH_
    variables, as an operator would type it."""
    variables = [
        f"{name}={shlex.quote(value)}" for name, value in sorted(os.environ.items())
        if name.startswith("BENCH_") and name not in ("BENCH_ENTRY", "BENCH_STARTED")
    ]
    entry = os.environ.get("BENCH_ENTRY")
    arguments = sys.argv[1:]
    if entry:
        # bench/run.sh adds --build itself.
        arguments = [arg for arg in arguments if arg != "--build"]
    else:
        entry = "python3 bench/bench.py"
    return " ".join(variables + [entry] + [shlex.quote(arg) for arg in arguments])


def check_tools():
    if not Path("/usr/bin/time").is_file():
        raise BenchError("/usr/bin/time is missing; run bench/install-bench-deps.sh")
    moto = report.moto_version()
    if report.parse_version(moto) < (5, 2, 5):
        raise BenchError(
            f"moto_server runs moto {moto}; the benchmark needs 5.2.5 or newer, because "
            f"5.2.1 mishandles CompleteMultipartUpload. Run bench/install-bench-deps.sh"
        )


def started_at():
    """Returns the time.monotonic() value at which bench/run.sh started,
    or now when this script was started directly."""
    text = os.environ.get("BENCH_STARTED", "").strip()
    now = time.monotonic()
    if not text.isdigit():
        return now
    return now - max(0.0, time.time() - int(text))


def keep_logs(scratch):
    """Copies the run's logs to BENCH_LOGS, when set, before the scratch
    directory goes."""
    target = os.environ.get("BENCH_LOGS")
    source = scratch.path / "logs"
    if target and source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
        for extra in ("postgres.log", "moto.log", "cargo-build.log"):
            if (scratch.path / extra).is_file():
                shutil.copy(scratch.path / extra, target)


def raise_on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    sweep_mode = "--sweep" in sys.argv[1:]
    build_mode = "--build" in sys.argv[1:]
    unknown = [arg for arg in sys.argv[1:] if arg not in ("--sweep", "--build")]
    if unknown:
        print(__doc__, file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_on_signal)

    run_started = started_at()
    agent = Path(os.environ.get("MATRIX_AGENT_BIN") or REPO / "target/release/matrix-agent")
    results_path = os.environ.get("BENCH_RESULTS") or str(REPO / "bench/results.md")
    scratch = None
    try:
        scale_mib = env_number("BENCH_SCALE", 256 if sweep_mode else 1024)
        rounds_requested = env_number("BENCH_ROUNDS", 0)
        budget = env_number("BENCH_BUDGET", 570.0, float)
        repeats = env_number("BENCH_REPEATS", 3)
        check_tools()
        scratch = Scratch()
        build = AgentBuild(scratch, REPO) if build_mode else None
        registration = RegistrationServer(scratch)
        bench = Bench(scratch, agent, build)
        if sweep_mode:
            text = sweep.run(bench, scale_mib, repeats, invocation())
            section = "sweep"
        else:
            text = comparison.run(
                bench, registration, scale_mib, rounds_requested, budget, run_started,
                invocation(),
            )
            section = "main run"
        print()
        print(text)
        if results_path != "-":
            report.replace_section(results_path, section, text)
            print(f"\nwrote the {section} section of {results_path}")
        print(f"finished in {seconds(time.monotonic() - run_started)}")
        return 0
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        if scratch is not None:
            print("bench: set BENCH_LOGS=DIR to keep every command's log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if scratch is not None:
            keep_logs(scratch)
            scratch.close()


if __name__ == "__main__":
    sys.exit(main())
