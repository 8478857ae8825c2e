"""The benchmark database: half pgbench tables, which compress well in a
dump, and half random bytea, which does not compress at all."""

import os
import struct
import subprocess
from dataclasses import dataclass

from services import BenchError, run_checked

MIB = 1 << 20
# pgbench_accounts and its primary key take about 15 MiB per scale unit
# (100,000 accounts) on PostgreSQL 15; the small tables add little.
PGBENCH_MIB_PER_SCALE = 15.0
PGBENCH_SHARE = 0.5
BLOB_ROW_BYTES = 256 * 1024
# On-disk bytes per payload byte of an uncompressed TOASTed bytea: each
# 1996-byte chunk is a heap tuple with its own header and line pointer, and
# the chunk table has an index (measured on PostgreSQL 15).
TOAST_OVERHEAD = 1.04

COPY_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_BINARY_TRAILER = struct.pack("!h", -1)


@dataclass
class Dataset:
    pgbench_scale: int
    blob_rows: int
    database_bytes: int
    accounts: int


def _load_blobs(cluster, database, rows):
    """Streams `rows` random payloads into the blobs table with COPY in
    binary format, so the bytes cross the connection once and unencoded."""
    env = {**os.environ, **cluster.client_env(database)}
    copy = subprocess.Popen(
        [str(cluster.pg_bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
         "-c", "COPY blobs (payload) FROM STDIN WITH (FORMAT binary)"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    field_header = struct.pack("!hi", 1, BLOB_ROW_BYTES)
    try:
        copy.stdin.write(COPY_BINARY_HEADER)
        for _ in range(rows):
            copy.stdin.write(field_header)
            copy.stdin.write(os.urandom(BLOB_ROW_BYTES))
        copy.stdin.write(COPY_BINARY_TRAILER)
        copy.stdin.close()
    except BrokenPipeError:
        pass
    stderr = copy.stderr.read().decode(errors="replace")
    if copy.wait() != 0:
        raise BenchError(f"loading the blobs table failed: {stderr.strip()}")


def populate(cluster, database, size_mib):
    """Creates `database` and fills it to about `size_mib` MiB on disk."""
    cluster.recreate_database(database)
    scale = max(1, round(size_mib * PGBENCH_SHARE / PGBENCH_MIB_PER_SCALE))
    env = {**os.environ, **cluster.client_env(database)}
    run_checked(
        [str(cluster.pg_bin / "pgbench"), "--initialize", "--quiet", f"--scale={scale}"],
        f"pgbench --initialize --scale={scale}",
        env=env,
    )

    cluster.psql(
        database,
        "CREATE TABLE blobs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "payload bytea NOT NULL);"
        # Random bytes never compress, so PostgreSQL should not try.
        "ALTER TABLE blobs ALTER COLUMN payload SET STORAGE EXTERNAL",
    )
    pgbench_bytes = int(cluster.psql(database, "SELECT pg_database_size(current_database())"))
    missing = max(0, size_mib * MIB - pgbench_bytes)
    rows = round(missing / TOAST_OVERHEAD / BLOB_ROW_BYTES)
    if rows > 0:
        _load_blobs(cluster, database, rows)
    cluster.psql(database, "VACUUM ANALYZE blobs")
    cluster.quiesce()
    return Dataset(
        pgbench_scale=scale,
        blob_rows=rows,
        database_bytes=int(
            cluster.psql(database, "SELECT pg_database_size(current_database())")
        ),
        accounts=int(cluster.psql(database, "SELECT count(*) FROM pgbench_accounts")),
    )


def check_restored(cluster, database, dataset):
    """Raises BenchError unless `database` has the dataset's row counts."""
    accounts = int(cluster.psql(database, "SELECT count(*) FROM pgbench_accounts"))
    blobs = int(cluster.psql(database, "SELECT count(*) FROM blobs"))
    if accounts != dataset.accounts or blobs != dataset.blob_rows:
        raise BenchError(
            f"the restored database {database} has {accounts} accounts and {blobs} blobs; "
            f"expected {dataset.accounts} and {dataset.blob_rows}"
        )
