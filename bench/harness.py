"""The benchmark's world: a cluster with the source database, a moto
bucket, the agent's state directory and marker, and one method for each
operation the benchmark times."""

import datetime
import json
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import dataset
from measure import Measurement, run_measured
from services import (
    AwsCli, BenchError, Cluster, MotoServer, free_port, newest_pg_bin, stop_process_group,
)

MIB = 1 << 20
# How long the heartbeat runs before its memory is read.
HEARTBEAT_IDLE = 20.0

BUCKET = "matrix-bench"
USER_ID = "user_bench"
PREFIX = f"matrixos-sync/{USER_ID}/"
SOURCE_DB = "bench_source"
RESTORE_DB = "bench_restore"
ACCESS_KEY_ID = "bench-access-key"
SECRET_ACCESS_KEY = "bench-secret-key"
# The snapshot every restore reads, under a name no backup of today takes:
# a copy of the first agent backup, so that agent and baseline restore the
# same bytes whatever ran before them.
RESTORE_SOURCE = "system/db/snapshots/2000-01-01T0000Z.dump"
BASELINE_KEY = "baseline/bench.dump"

def is_state_record(name):
    """Tells the agent's small state files (last-backup.json, backup.lock
    and the like) from dump data in the state directory."""
    return name == "backup.lock" or name.endswith((".json", ".json.tmp"))


@dataclass
class BaselineBackup:
    total: float
    dump: Measurement
    upload: Measurement
    file_bytes: int


@dataclass
class BaselineRestore:
    total: float
    download: Measurement
    restore: Measurement
    file_bytes: int


class Bench:
    """One cluster, one moto server and the agent's directories, with one
    method per measured operation."""

    def __init__(self, scratch, agent, build=None):
        self.scratch = scratch
        self.agent = agent
        self.build = build
        self.logs = scratch.path / "logs"
        self.logs.mkdir()
        self.log_number = 0
        self.machine_id = str(uuid.uuid4())
        self.state_dir = scratch.path / "var-lib-matrix"
        self.state_dir.mkdir()
        self.marker = scratch.path / "restore-complete"
        self.dump_file = scratch.path / "baseline.dump"

        self.pg_bin = newest_pg_bin()
        self.cluster = Cluster(scratch, self.pg_bin)
        self.cluster.start()
        self.moto = MotoServer(scratch)
        self.moto.start()
        self.aws = AwsCli(scratch, self.moto.endpoint, ACCESS_KEY_ID, SECRET_ACCESS_KEY)
        self.aws.create_bucket(BUCKET)
        self.fake_pg_root = self._fake_pg_install_root()
        self.dataset = None

    def wait_for_agent(self):
        """Waits for the agent's build, when this run builds it, and checks
        that the binary exists."""
        if self.build is not None:
            print("waiting for cargo build --release -p matrix-agent ...", flush=True)
            self.build.wait()
            self.build = None
        if not self.agent.is_file():
            raise BenchError(
                f"{self.agent} does not exist; build it with "
                f"`cargo build --release -p matrix-agent`"
            )

    def log_path(self, label):
        self.log_number += 1
        return self.logs / f"{self.log_number:03d}-{label}.log"

    def agent_env(self, database, **overrides):
        """Returns the agent's environment as the systemd units set it,
        pointed at the bench cluster and bucket."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.scratch.path),
            "LANG": "C.UTF-8",
            "MATRIX_MACHINE_ID": self.machine_id,
            "MATRIX_CLERK_USER_ID": USER_ID,
            "MATRIX_R2_BUCKET": BUCKET,
            "MATRIX_R2_PREFIX": PREFIX,
            "R2_ENDPOINT": self.moto.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": "auto",
            "AWS_EC2_METADATA_DISABLED": "true",
            "POSTGRES_DB": database,
            "POSTGRES_USER": Cluster.SUPERUSER,
            "POSTGRES_PASSWORD": "bench",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.cluster.port),
            "MATRIX_STATE_DIR": str(self.state_dir),
            "MATRIX_RESTORE_MARKER": str(self.marker),
        }
        env.update({name: str(value) for name, value in overrides.items() if value is not None})
        return env

    def _fake_pg_install_root(self):
        """Builds an install root whose pg_dump prints the baseline's dump
        file, so that the agent uploads exactly the bytes aws s3 cp did."""
        major = self.pg_bin.parent.name
        bin_dir = self.scratch.path / "fake-pg" / major / "bin"
        bin_dir.mkdir(parents=True)
        version = subprocess.run(
            [str(self.pg_bin / "pg_dump"), "--version"], capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        script = bin_dir / "pg_dump"
        script.write_text(
            "#!/bin/sh\n"
            f'if [ "$1" = --version ]; then echo {shlex.quote(version)}; exit 0; fi\n'
            f"exec cat {shlex.quote(str(self.dump_file))}\n",
            encoding="utf-8",
        )
        script.chmod(0o755)
        return bin_dir.parent.parent

    # --- bucket and database preparation, never timed ------------------------

    def clear_snapshots(self):
        """Deletes every object under system/db/ but the restore source, so
        that the next backup finds its minute's name free."""
        self.aws.run(
            "s3", "rm", f"s3://{BUCKET}/{PREFIX}system/db/", "--recursive",
            "--exclude", f"*{Path(RESTORE_SOURCE).name}", "--only-show-errors",
        )

    def publish_restore_source(self):
        """Copies the snapshot `latest` names to RESTORE_SOURCE."""
        latest = self._read_object(PREFIX + "system/db/latest").strip()
        self.aws.run(
            "s3api", "copy-object", "--bucket", BUCKET, "--key", PREFIX + RESTORE_SOURCE,
            "--copy-source", f"{BUCKET}/{PREFIX}{latest}",
        )

    def point_latest_at_restore_source(self):
        pointer = self.scratch.path / "latest"
        pointer.write_text(RESTORE_SOURCE + "\n", encoding="utf-8")
        self.aws.run(
            "s3api", "put-object", "--bucket", BUCKET, "--key", PREFIX + "system/db/latest",
            "--body", str(pointer), "--content-type", "text/plain; charset=utf-8",
        )

    def _read_object(self, key):
        target = self.scratch.path / "object"
        self.aws.run("s3api", "get-object", "--bucket", BUCKET, "--key", key, str(target))
        text = target.read_text(encoding="utf-8")
        target.unlink()
        return text

    def last_backup(self):
        record = json.loads((self.state_dir / "last-backup.json").read_text(encoding="utf-8"))
        return record["last_success"]

    def _prepare_restore(self):
        self.point_latest_at_restore_source()
        self.cluster.recreate_database(RESTORE_DB)
        self.marker.unlink(missing_ok=True)
        self.cluster.quiesce()

    # --- measured operations --------------------------------------------------

    def agent_backup(self, label="agent-backup", **knobs):
        """Runs `matrix-agent backup`; `knobs` are extra agent variables."""
        self.clear_snapshots()
        self.marker.write_text("opened by the benchmark\n", encoding="utf-8")
        self.cluster.quiesce()
        return run_measured(
            [str(self.agent), "backup"], self.agent_env(SOURCE_DB, **knobs),
            self.log_path(label), watch_dir=self.state_dir, ignore=is_state_record,
        )

    def agent_upload_only(self):
        """Runs `matrix-agent backup` with a pg_dump that prints the
        baseline's dump file: the agent's upload path alone."""
        self.clear_snapshots()
        self.marker.write_text("opened by the benchmark\n", encoding="utf-8")
        return run_measured(
            [str(self.agent), "backup"],
            self.agent_env(SOURCE_DB, MATRIX_PG_INSTALL_ROOT=self.fake_pg_root),
            self.log_path("agent-upload-only"), watch_dir=self.state_dir,
            ignore=is_state_record,
        )

    def baseline_backup(self):
        """Runs `pg_dump -Fc -f FILE` then `aws s3 cp FILE s3://...` and keeps
        FILE for the upload ceiling; `remove_baseline_dump` deletes it."""
        self.remove_baseline_dump()
        self.cluster.quiesce()
        env = {**os.environ, **self.cluster.client_env(SOURCE_DB)}
        started = time.monotonic()
        dump = run_measured(
            [str(self.pg_bin / "pg_dump"), "-Fc", "-f", str(self.dump_file)],
            env, self.log_path("baseline-pg-dump"),
        )
        upload = run_measured(
            self.aws.argv("s3", "cp", "--only-show-errors", str(self.dump_file),
                          f"s3://{BUCKET}/{BASELINE_KEY}"),
            self.aws.env, self.log_path("baseline-aws-upload"),
        )
        total = time.monotonic() - started
        return BaselineBackup(total, dump, upload, self.dump_file.stat().st_size)

    def remove_baseline_dump(self):
        self.dump_file.unlink(missing_ok=True)
        self.aws.run("s3", "rm", f"s3://{BUCKET}/{BASELINE_KEY}", "--only-show-errors")

    def dump_to_null(self, compression=None):
        """Runs `pg_dump -Fc -f /dev/null`: how fast the dump alone goes."""
        self.cluster.quiesce()
        # pg_dump fsyncs its output file, which /dev/null rejects.
        argv = [str(self.pg_bin / "pg_dump"), "-Fc", "--no-sync", "-f", "/dev/null"]
        if compression is not None:
            argv.append(f"--compress={compression}")
        return run_measured(
            argv, {**os.environ, **self.cluster.client_env(SOURCE_DB)},
            self.log_path("pg-dump-to-null"),
        )

    def agent_restore(self, label="agent-restore", **knobs):
        """Runs `matrix-agent restore` into a fresh database with no marker."""
        self._prepare_restore()
        measurement = run_measured(
            [str(self.agent), "restore"], self.agent_env(RESTORE_DB, **knobs),
            self.log_path(label), watch_dir=self.state_dir, ignore=is_state_record,
        )
        dataset.check_restored(self.cluster, RESTORE_DB, self.dataset)
        return measurement

    def baseline_restore(self):
        """Runs `aws s3 cp s3://... FILE` then `pg_restore` with one job into
        a fresh database, as the restore script did."""
        self._prepare_restore()
        download_dir = self.scratch.path / "baseline-download"
        download_dir.mkdir(exist_ok=True)
        target = download_dir / "restore.dump"
        env = {**os.environ, **self.cluster.client_env(RESTORE_DB)}
        started = time.monotonic()
        download = run_measured(
            self.aws.argv("s3", "cp", "--only-show-errors",
                          f"s3://{BUCKET}/{PREFIX}{RESTORE_SOURCE}", str(target)),
            self.aws.env, self.log_path("baseline-aws-download"),
        )
        restore = run_measured(
            [str(self.pg_bin / "pg_restore"), "--clean", "--if-exists", "--exit-on-error",
             "--no-password", f"--dbname={RESTORE_DB}", str(target)],
            env, self.log_path("baseline-pg-restore"),
        )
        total = time.monotonic() - started
        size = target.stat().st_size
        target.unlink()
        dataset.check_restored(self.cluster, RESTORE_DB, self.dataset)
        return BaselineRestore(total, download, restore, size)

    def aws_single_get_download(self):
        """Downloads the restore source with `aws s3 cp` in one GET, the
        way the agent reads it, and deletes the file again."""
        target = self.scratch.path / "single-get.dump"
        measurement = run_measured(
            self.aws.argv("s3", "cp", "--only-show-errors",
                          f"s3://{BUCKET}/{PREFIX}{RESTORE_SOURCE}", str(target)),
            self.aws.single_request_env, self.log_path("aws-single-get-download"),
        )
        target.unlink()
        return measurement

    # --- heartbeat -------------------------------------------------------------

    def start_heartbeat(self, registration):
        """Starts `matrix-agent heartbeat` with its own state directory and
        an open gate. Returns (process, status address, start time)."""
        state_dir = self.scratch.path / "heartbeat-state"
        state_dir.mkdir()
        marker = self.scratch.path / "heartbeat-restore-complete"
        marker.write_text("opened by the benchmark\n", encoding="utf-8")
        status_address = f"127.0.0.1:{free_port()}"
        env = self.agent_env(
            SOURCE_DB,
            MATRIX_STATE_DIR=state_dir,
            MATRIX_RESTORE_MARKER=marker,
            MATRIX_PLATFORM_REGISTER_URL=registration.url,
            MATRIX_REGISTRATION_TOKEN="bench-registration-token",
            MATRIX_IMAGE_VERSION="matrix-os-host-bench",
            MATRIX_HETZNER_SERVER_ID=1,
            MATRIX_PUBLIC_IPV4="203.0.113.1",
            MATRIX_STATUS_LISTEN=status_address,
            MATRIX_HEARTBEAT_INTERVAL="5s",
            MATRIX_INSTANCE_DATA=self.scratch.path / "no-instance-data.json",
        )
        log = open(self.log_path("heartbeat"), "wb")  # noqa: SIM115 - closed by the cleanup
        process = subprocess.Popen(
            [str(self.agent), "heartbeat"], stdin=subprocess.DEVNULL, stdout=log,
            stderr=log, env=env, start_new_session=True,
        )
        self.scratch.on_close(log.close)
        self.scratch.on_close(lambda: stop_process_group(process))
        return process, status_address, time.monotonic()

    def finish_heartbeat(self, heartbeat, registration):
        """Waits until the heartbeat has run HEARTBEAT_IDLE seconds, checks
        that it registered and serves /healthz, and returns its VmHWM."""
        process, status_address, started = heartbeat
        time.sleep(max(0.0, started + HEARTBEAT_IDLE - time.monotonic()))
        if process.poll() is not None:
            raise BenchError(f"matrix-agent heartbeat exited with status {process.returncode}")
        with open(f"/proc/{process.pid}/status", encoding="utf-8") as status:
            values = dict(line.split(":", 1) for line in status if ":" in line)
        peak = int(values["VmHWM"].split()[0]) * 1024
        if not registration.requests:
            raise BenchError("matrix-agent heartbeat never called the registration endpoint")
        try:
            urllib.request.urlopen(f"http://{status_address}/healthz", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # an unhealthy answer is still an answer from an idle process
        stop_process_group(process)
        return peak


def agent_compression(log_path):
    """Returns the pg_dump compression level a backup's log names, or None
    when the log has no "at compression level N" line."""
    match = re.search(r"at compression level (\d+)", Path(log_path).read_text(errors="replace"))
    return int(match.group(1)) if match else None


# The agent's log lines that start and end each step it takes, as
# (step, first line's text, last line's text).
AGENT_STEPS = (
    ("stream", "dumping into ", "dump uploaded: "),
    ("publish", "dump uploaded: ", "backup finished: "),
    ("download", "downloading ", "download finished: "),
    ("pg_restore", "restoring into ", "pg_restore finished"),
    ("analyze", "running ANALYZE", "restore gate open"),
)


def agent_steps(log_path):
    """Returns {step: seconds} for the steps of AGENT_STEPS whose two lines
    are both in the agent's log, timed by the log's own timestamps."""
    seen = {}
    for line in Path(log_path).read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            continue
        message = rest.strip().partition(" ")[2]
        for _, first, last in AGENT_STEPS:
            for text in (first, last):
                if message.startswith(text) and text not in seen:
                    seen[text] = moment
    return {
        step: (seen[last] - seen[first]).total_seconds()
        for step, first, last in AGENT_STEPS
        if first in seen and last in seen
    }
