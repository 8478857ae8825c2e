"""The --sweep mode: the agent alone under different settings of its
tuning variables, to choose their defaults."""

import dataset
import report
from harness import SOURCE_DB, agent_compression, agent_steps
from report import mebibytes, median, seconds, table

PART_SIZES_MIB = (8, 16, 32)
CONCURRENCIES = (2, 4, 8)
# Level 6 is pg_dump's own default, which the baseline uses.
COMPRESSION_LEVELS = (0, 1, 3, 6)
RESTORE_JOBS = (1, 2, 4)


def parts_in_flight(log_path):
    """Returns the parts in flight that the agent logged, "(N in flight)"."""
    text = log_path.read_text(errors="replace")
    end = text.find(" in flight)")
    if end < 0:
        return "?"
    return text[text.rfind("(", 0, end) + 1:end]


def step_median(runs, step):
    values = [agent_steps(run.log_path).get(step) for run in runs]
    return median([value for value in values if value is not None])


def sweep_uploads(bench, repeats):
    rows = []
    compression = None
    for part in PART_SIZES_MIB:
        for concurrency in CONCURRENCIES:
            label = f"backup-part{part}-c{concurrency}"
            runs = [
                bench.agent_backup(
                    label, MATRIX_PART_SIZE=f"{part}MiB", MATRIX_UPLOAD_CONCURRENCY=concurrency
                )
                for _ in range(repeats)
            ]
            wall = median([run.wall for run in runs])
            compression = agent_compression(runs[0].log_path)
            rows.append([
                f"{part} MiB", str(concurrency), parts_in_flight(runs[-1].log_path),
                seconds(wall), seconds(step_median(runs, "stream")),
                seconds(step_median(runs, "publish")),
                mebibytes(max(run.peak_rss("matrix-agent") for run in runs)),
            ])
            print(f"{label}: {seconds(wall)}", flush=True)
    dump_to_null = median([bench.dump_to_null(compression).wall for _ in range(repeats)])
    return "\n\n".join([
        "### Part size and upload concurrency (default compression)",
        f"Median of {repeats} backups each. `pg_dump -Fc --compress={compression} -f "
        f"/dev/null`, the agent's default level, takes {seconds(dump_to_null)}. The "
        f"agent lowers the parts in flight so that part buffers stay within 32 MiB, "
        f"so several settings run alike. \"stream\" is "
        f"pg_dump into the staging upload; \"publish\" is the server-side copy to the "
        f"snapshot key, the check and the pointer move.",
        table(["part size", "concurrency", "parts in flight", "backup", "stream", "publish",
               "agent peak RSS"], rows),
    ])


def sweep_compression(bench, repeats):
    rows = []
    for level in COMPRESSION_LEVELS:
        name = str(level)
        dump_to_null = median([bench.dump_to_null(level).wall for _ in range(repeats)])
        backups = [
            bench.agent_backup(f"backup-z{level}", MATRIX_DUMP_COMPRESSION=level)
            for _ in range(repeats)
        ]
        size = bench.last_backup()["size"]
        bench.publish_restore_source()
        restores = [bench.agent_restore(f"restore-z{level}") for _ in range(repeats)]
        backup_wall = median([run.wall for run in backups])
        restore_wall = median([run.wall for run in restores])
        rows.append([
            name, mebibytes(size), seconds(dump_to_null), seconds(backup_wall),
            seconds(step_median(backups, "stream")), seconds(restore_wall),
            seconds(step_median(restores, "download")),
            seconds(step_median(restores, "pg_restore")),
        ])
        print(f"compression {name}: backup {seconds(backup_wall)}, restore "
              f"{seconds(restore_wall)}", flush=True)
    return "\n\n".join([
        "### Dump compression (default part size and concurrency)",
        f"Median of {repeats} runs each. The restore columns restore that level's dump "
        f"with the default jobs.",
        table(["MATRIX_DUMP_COMPRESSION", "dump size", "pg_dump to /dev/null",
               "agent backup", "stream", "agent restore", "download", "pg_restore"], rows),
    ])


def sweep_restore_jobs(bench, repeats):
    bench.agent_backup("backup-for-restore")
    bench.publish_restore_source()
    rows = []
    for jobs in RESTORE_JOBS:
        restores = [
            bench.agent_restore(f"restore-j{jobs}", MATRIX_RESTORE_JOBS=jobs)
            for _ in range(repeats)
        ]
        wall = median([run.wall for run in restores])
        rows.append([
            str(jobs), seconds(wall), seconds(step_median(restores, "pg_restore")),
            mebibytes(max(run.peak_rss("matrix-agent") for run in restores)),
            mebibytes(max(run.peak_tree_rss for run in restores)),
        ])
        print(f"restore jobs {jobs}: {seconds(wall)}", flush=True)
    return "\n\n".join([
        "### Restore jobs (default compression)",
        f"Median of {repeats} restores each.",
        table(["MATRIX_RESTORE_JOBS", "agent restore", "pg_restore", "agent peak RSS",
               "agent and pg_restore processes together (sampled sum)"], rows),
    ])


def run(bench, scale_mib, repeats, command):
    """Runs the sweep and returns its report as Markdown."""
    print(f"generating a {scale_mib} MiB database ...", flush=True)
    bench.dataset = dataset.populate(bench.cluster, SOURCE_DB, scale_mib)
    data = bench.dataset
    print(f"database: {mebibytes(data.database_bytes)} on disk", flush=True)
    bench.wait_for_agent()
    sections = [
        sweep_uploads(bench, repeats),
        sweep_compression(bench, repeats),
        sweep_restore_jobs(bench, repeats),
    ]
    settings = {
        "database": f"{mebibytes(data.database_bytes)} on disk: pgbench scale "
                    f"{data.pgbench_scale} and {data.blob_rows} random bytea rows of 256 KiB",
        "repeats": str(repeats),
    }
    preamble = report.preamble(bench.agent, bench.pg_bin, command, settings)
    return "\n\n".join(["## Tuning sweep", preamble] + sections)
