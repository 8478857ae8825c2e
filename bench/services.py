"""The servers a benchmark run starts on 127.0.0.1, and the scratch directory
that holds their files.

Every server here is a child of this process and is stopped by
`Scratch.close`, which the benchmark calls on success, on failure and on
SIGINT, SIGTERM or SIGHUP.
"""

import contextlib
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PG_INSTALL_ROOT = Path("/usr/lib/postgresql")
SERVER_PROGRAMS = ("postgres", "initdb", "pg_ctl", "psql", "pg_dump", "pg_restore", "pgbench")
START_TIMEOUT = 60.0


class BenchError(Exception):
    """A failure that ends the run with a message and no traceback."""


def free_port():
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_checked(argv, what, **kwargs):
    """Runs a setup command and raises BenchError with its output on failure."""
    completed = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs
    )
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip()
        raise BenchError(f"{what} failed with exit status {completed.returncode}:\n{output}")
    return completed.stdout


def stop_process_group(process, grace=10.0):
    """Sends SIGTERM to a process started with start_new_session=True and
    its children, then SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Scratch:
    """A temporary directory plus the cleanups for everything started in it,
    run newest first."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="matrix-bench-"))
        # The postgres account must reach its data directory inside.
        self.path.chmod(0o711)
        self._cleanups = []

    def on_close(self, cleanup):
        self._cleanups.append(cleanup)

    def close(self):
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception as error:  # noqa: BLE001 - keep cleaning up
                print(f"bench: cleanup step failed: {error}", flush=True)
        shutil.rmtree(self.path, ignore_errors=True)


class AgentBuild:
    """`cargo build --release -p matrix-agent` running in the background, so
    that the build overlaps the cluster start and the dataset generation."""

    def __init__(self, scratch, repo):
        self.log_path = scratch.path / "cargo-build.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["cargo", "build", "--release", "--quiet", "-p", "matrix-agent",
                 "--manifest-path", str(repo / "Cargo.toml")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        scratch.on_close(lambda: stop_process_group(self.process))

    def wait(self):
        """Waits for the build and raises BenchError when it failed."""
        if self.process.wait() != 0:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-20:]
            raise BenchError(
                f"cargo build --release -p matrix-agent exited with status "
                f"{self.process.returncode}:\n" + "\n".join(tail)
            )


def newest_pg_bin():
    """Returns the bin directory of the newest PostgreSQL major under
    /usr/lib/postgresql that has every program the benchmark runs."""
    majors = []
    for bin_dir in PG_INSTALL_ROOT.glob("*/bin"):
        if bin_dir.parent.name.isdigit() and all(
            (bin_dir / program).is_file() for program in SERVER_PROGRAMS
        ):
            majors.append((int(bin_dir.parent.name), bin_dir))
    if not majors:
        raise BenchError(
            f"no PostgreSQL server with {', '.join(SERVER_PROGRAMS)} under "
            f"{PG_INSTALL_ROOT}; run bench/install-bench-deps.sh"
        )
    return max(majors)[1]


class Cluster:
    """A throwaway PostgreSQL cluster listening on 127.0.0.1 only, with
    trust authentication for the superuser `postgres`."""

    SUPERUSER = "postgres"

    def __init__(self, scratch, pg_bin):
        self.pg_bin = pg_bin
        self.port = free_port()
        self.data_dir = scratch.path / "pgdata"
        self.socket_dir = scratch.path / "pgsocket"
        self.log_path = scratch.path / "postgres.log"
        # initdb and postgres reject root, so as root the cluster belongs to
        # the postgres system account that the Debian packages create.
        self.account = None
        if os.getuid() == 0:
            try:
                self.account = pwd.getpwnam("postgres")
            except KeyError:
                raise BenchError(
                    "running as root needs the 'postgres' system user; "
                    "run bench/install-bench-deps.sh"
                ) from None
        self._scratch = scratch

    def _as_owner(self, argv):
        if self.account is None:
            return argv
        return ["runuser", "-u", self.account.pw_name, "--"] + argv

    def _own(self, path):
        path.mkdir(mode=0o700, exist_ok=True)
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def start(self):
        self._own(self.data_dir)
        self._own(self.socket_dir)
        log = self.log_path
        log.touch()
        if self.account is not None:
            os.chown(log, self.account.pw_uid, self.account.pw_gid)
        run_checked(
            self._as_owner([
                str(self.pg_bin / "initdb"), "-D", str(self.data_dir),
                "-U", self.SUPERUSER, "--auth=trust", "--encoding=UTF8",
                "--locale=C", "--no-sync",
            ]),
            "initdb",
            cwd="/",
        )
        settings = (
            f"listen_addresses = '127.0.0.1'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
        )
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(settings)
        self._scratch.on_close(self.stop)
        run_checked(
            self._as_owner([
                str(self.pg_bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log),
                "-w", "-t", str(int(START_TIMEOUT)), "start",
            ]),
            "pg_ctl start",
            cwd="/",
        )

    def stop(self):
        if not (self.data_dir / "postmaster.pid").exists():
            return
        subprocess.run(
            self._as_owner([
                str(self.pg_bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast",
                "-w", "-t", "60", "stop",
            ]),
            cwd="/", stdin=subprocess.DEVNULL, capture_output=True, check=False,
        )

    def client_env(self, database):
        """Returns libpq variables for connecting to `database`."""
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": self.SUPERUSER,
            "PGDATABASE": database,
        }

    def psql(self, database, sql):
        """Runs `sql` and returns psql's unaligned, tuples-only output."""
        env = {**os.environ, **self.client_env(database)}
        return run_checked(
            [str(self.pg_bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            f"psql ({sql.splitlines()[0][:60]})",
            env=env,
        ).strip()

    def recreate_database(self, database):
        self.psql("postgres", f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        self.psql("postgres", f'CREATE DATABASE "{database}"')

    def quiesce(self):
        """Writes dirty buffers out, so one timed step does not pay for the
        writes of the step before it."""
        self.psql("postgres", "CHECKPOINT")
        os.sync()


class MotoServer:
    """moto's standalone S3 server on 127.0.0.1.

    moto keeps an object in memory up to about 5 MiB and spills larger ones
    to temporary files, here under the scratch directory.
    """

    def __init__(self, scratch):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = scratch.path / "moto.log"
        self.tmp_dir = scratch.path / "moto-tmp"
        self._scratch = scratch
        self.process = None

    def start(self):
        self.tmp_dir.mkdir()
        env = {**os.environ, "TMPDIR": str(self.tmp_dir)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["moto_server", "--host", "127.0.0.1", "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True,
            )
        self._scratch.on_close(lambda: stop_process_group(self.process))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"moto_server exited with status {self.process.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise BenchError(f"moto_server did not answer on {self.endpoint} within {START_TIMEOUT:.0f}s")


class AwsCli:
    """The AWS CLI aimed at the moto server, configured like the shell
    scripts that the agent replaces: default transfer settings, path-style
    addressing, and request checksums only where required, as R2 needs.

    Reads no configuration or credentials from the home directory and never
    queries the instance metadata service.
    """

    REGION = "auto"

    def __init__(self, scratch, endpoint, access_key_id, secret_access_key):
        self.endpoint = endpoint
        config = scratch.path / "aws-config"
        config.write_text("[default]\ns3 =\n    addressing_style = path\n", encoding="utf-8")
        # The same, but transfers below 64 GiB go in one request each: a
        # download is one GET instead of parallel ranged GETs.
        single_request_config = scratch.path / "aws-config-single-request"
        single_request_config.write_text(
            "[default]\ns3 =\n    addressing_style = path\n    multipart_threshold = 64GB\n",
            encoding="utf-8",
        )
        credentials = scratch.path / "aws-credentials"
        credentials.write_text("", encoding="utf-8")
        self.env = {
            **os.environ,
            "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_ACCESS_KEY_ID": access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret_access_key,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_PAGER": "",
        }
        self.env.pop("AWS_SESSION_TOKEN", None)
        self.env.pop("AWS_PROFILE", None)
        self.single_request_env = {**self.env, "AWS_CONFIG_FILE": str(single_request_config)}

    def argv(self, *args):
        """Returns the command line for `aws ARGS` against the moto server."""
        return ["aws", *args, "--endpoint-url", self.endpoint, "--region", self.REGION]

    def run(self, *args):
        return run_checked(self.argv(*args), "aws " + " ".join(args[:2]), env=self.env)

    def create_bucket(self, bucket):
        self.run(
            "s3api", "create-bucket", "--bucket", bucket,
            "--create-bucket-configuration", f"LocationConstraint={self.REGION}",
        )

    def remove_prefix(self, bucket, prefix):
        self.run("s3", "rm", f"s3://{bucket}/{prefix}", "--recursive", "--only-show-errors")

    def object_size(self, bucket, key):
        head = json.loads(self.run("s3api", "head-object", "--bucket", bucket, "--key", key))
        return int(head["ContentLength"])


class RegistrationServer:
    """A stand-in for the platform's `POST /vps/register` that accepts every
    request with `200 {"registered": true, "status": "running"}`."""

    def __init__(self, scratch):
        requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server interface
                length = int(self.headers.get("Content-Length", "0"))
                requests.append(self.rfile.read(length))
                body = json.dumps({"registered": True, "status": "running"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 - the http.server interface
                pass

        self.requests = requests
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/vps/register"
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        scratch.on_close(self._stop)

    def _stop(self):
        self._server.shutdown()
        self._server.server_close()
