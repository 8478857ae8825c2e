"""The default mode: rounds of agent against baseline, the ceilings that
bound them, the idle heartbeat, and the tables that report them."""

import os
import time
from dataclasses import dataclass

import dataset
import report
from harness import SOURCE_DB, BaselineBackup, BaselineRestore, agent_compression, agent_steps
from measure import Measurement
from report import disk_size, mebibytes, median, ratio, seconds, table

MIB = 1 << 20
MIN_ROUNDS = 3
MAX_ROUNDS = 5
# Seconds the report and the cleanup take after the last round.
FINISH_TIME = 15.0

# The project's targets.
BACKUP_SPEEDUP_TARGET = 1.5
CEILING_MARGIN_TARGET = 1.15
RESTORE_SPEEDUP_TARGET = 1.2
AGENT_RSS_TARGET = 64 * MIB
HEARTBEAT_RSS_TARGET = 20 * MIB


@dataclass
class Round:
    agent_backup: Measurement
    baseline_backup: BaselineBackup
    agent_restore: Measurement
    baseline_restore: BaselineRestore
    wall: float


@dataclass
class Ceilings:
    """Measured once, in the first round."""

    # pg_dump at the compression level the agent's first backup used.
    compression: object
    dump_to_null: Measurement
    # The agent's backup with a pg_dump that prints the baseline's file.
    agent_upload_only: Measurement
    aws_single_get_download: Measurement
    wall: float


def measure_ceilings(bench, agent_backup):
    """Measures the ceilings, pg_dump at the level `agent_backup` used."""
    started = time.monotonic()
    compression = agent_compression(agent_backup.log_path)
    dump_to_null = bench.dump_to_null(compression)
    agent_upload_only = bench.agent_upload_only()
    aws_single_get_download = bench.aws_single_get_download()
    return Ceilings(
        compression, dump_to_null, agent_upload_only, aws_single_get_download,
        wall=time.monotonic() - started,
    )


def run_round(bench, number):
    """Runs one round and returns (Round, Ceilings or None). Odd rounds run
    the baseline first; the first round also measures the ceilings."""
    started = time.monotonic()
    order = ("agent", "baseline") if number % 2 == 0 else ("baseline", "agent")
    results = {}
    ceilings = None

    for side in order:
        if side == "agent":
            results["agent_backup"] = bench.agent_backup()
        else:
            results["baseline_backup"] = bench.baseline_backup()
    if number == 0:
        # The baseline leaves `latest` alone, so it names the agent's snapshot.
        bench.publish_restore_source()
        ceilings = measure_ceilings(bench, results["agent_backup"])
    bench.remove_baseline_dump()

    for side in order:
        if side == "agent":
            results["agent_restore"] = bench.agent_restore()
        else:
            results["baseline_restore"] = bench.baseline_restore()
    return Round(wall=time.monotonic() - started, **results), ceilings


def print_round(number, result):
    print(
        f"round {number + 1}: backup agent {seconds(result.agent_backup.wall)}, "
        f"baseline {seconds(result.baseline_backup.total)}; restore agent "
        f"{seconds(result.agent_restore.wall)}, baseline "
        f"{seconds(result.baseline_restore.total)}; round took {seconds(result.wall)}",
        flush=True,
    )


def rounds_that_fit(round_time, elapsed, budget):
    """Returns how many rounds in total fit in `budget` seconds when
    `elapsed` seconds are spent, one round is done and each further round
    takes `round_time`."""
    remaining = budget - elapsed - FINISH_TIME
    return max(1, min(MAX_ROUNDS, 1 + int(remaining // (round_time * 1.05))))


class Summary:
    """The medians and peaks of a run, named for the report."""

    def __init__(self, rounds, ceilings, heartbeat_rss):
        self.rounds = rounds
        self.ceilings = ceilings
        self.heartbeat_rss = heartbeat_rss

        self.backup_agent = median([r.agent_backup.wall for r in rounds])
        self.backup_baseline = median([r.baseline_backup.total for r in rounds])
        self.restore_agent = median([r.agent_restore.wall for r in rounds])
        self.restore_baseline = median([r.baseline_restore.total for r in rounds])
        self.aws_upload = median([r.baseline_backup.upload.wall for r in rounds])
        self.baseline_dump = median([r.baseline_backup.dump.wall for r in rounds])
        self.aws_download = median([r.baseline_restore.download.wall for r in rounds])
        self.local_restore = median([r.baseline_restore.restore.wall for r in rounds])
        self.dump_to_null = ceilings.dump_to_null.wall
        self.slower_ceiling = max(self.dump_to_null, self.aws_upload)
        # The baseline restore as it would run if its download took one GET.
        self.restore_baseline_single_get = (
            ceilings.aws_single_get_download.wall + self.local_restore
        )

        self.agent_backup_rss = max(r.agent_backup.peak_rss("matrix-agent") for r in rounds)
        self.agent_backup_tree_rss = max(r.agent_backup.peak_tree_rss for r in rounds)
        self.agent_backup_time_rss = max(r.agent_backup.time_max_rss for r in rounds)
        self.baseline_backup_rss = max(
            max(r.baseline_backup.dump.time_max_rss, r.baseline_backup.upload.time_max_rss)
            for r in rounds
        )
        self.agent_restore_rss = max(r.agent_restore.peak_rss("matrix-agent") for r in rounds)
        self.agent_restore_time_rss = max(r.agent_restore.time_max_rss for r in rounds)
        self.baseline_restore_rss = max(
            max(r.baseline_restore.download.time_max_rss,
                r.baseline_restore.restore.time_max_rss)
            for r in rounds
        )
        self.agent_backup_disk = max(r.agent_backup.peak_disk for r in rounds)
        self.baseline_backup_disk = max(r.baseline_backup.file_bytes for r in rounds)
        self.agent_restore_disk = max(r.agent_restore.peak_disk for r in rounds)
        self.baseline_restore_disk = max(r.baseline_restore.file_bytes for r in rounds)
        self.dump_bytes = rounds[-1].baseline_backup.file_bytes

        backup_steps = [agent_steps(r.agent_backup.log_path) for r in rounds]
        restore_steps = [agent_steps(r.agent_restore.log_path) for r in rounds]
        self.agent_steps = {
            step: median([steps[step] for steps in backup_steps + restore_steps if step in steps])
            for step in ("stream", "publish", "download", "pg_restore", "analyze")
        }
        self.upload_only_steps = agent_steps(ceilings.agent_upload_only.log_path)

    def results_table(self):
        return table(
            ["measure", "agent", "baseline", "baseline / agent"],
            [
                ["backup: median wall time", seconds(self.backup_agent),
                 seconds(self.backup_baseline), ratio(self.backup_baseline, self.backup_agent)],
                ["backup: peak RSS (agent process; baseline: larger of pg_dump, aws)",
                 mebibytes(self.agent_backup_rss), mebibytes(self.baseline_backup_rss),
                 ratio(self.baseline_backup_rss, self.agent_backup_rss)],
                ["backup: peak RSS of the agent or its pg_dump, whichever is larger",
                 mebibytes(self.agent_backup_time_rss), "", ""],
                ["backup: peak RSS of the agent and pg_dump together (sampled sum)",
                 mebibytes(self.agent_backup_tree_rss), "", ""],
                ["backup: peak extra local disk", disk_size(self.agent_backup_disk),
                 disk_size(self.baseline_backup_disk), ""],
                ["restore: median wall time", seconds(self.restore_agent),
                 seconds(self.restore_baseline),
                 ratio(self.restore_baseline, self.restore_agent)],
                ["restore: peak RSS (agent process; baseline: larger of aws, pg_restore)",
                 mebibytes(self.agent_restore_rss), mebibytes(self.baseline_restore_rss),
                 ratio(self.baseline_restore_rss, self.agent_restore_rss)],
                ["restore: peak RSS of the agent or its pg_restore, whichever is larger",
                 mebibytes(self.agent_restore_time_rss), "", ""],
                ["restore: peak extra local disk", disk_size(self.agent_restore_disk),
                 disk_size(self.baseline_restore_disk), ""],
                ["heartbeat: idle peak RSS (VmHWM) after the first round",
                 mebibytes(self.heartbeat_rss), "", ""],
            ],
        )

    def targets_table(self):
        def met(condition):
            return "yes" if condition else "**no**"

        return table(
            ["target", "measured", "met"],
            [
                [f"backup at least {BACKUP_SPEEDUP_TARGET}x faster than the baseline",
                 ratio(self.backup_baseline, self.backup_agent),
                 met(self.backup_baseline >= BACKUP_SPEEDUP_TARGET * self.backup_agent)],
                [f"backup within 15% of the slower ceiling ({seconds(self.slower_ceiling)})",
                 f"{self.backup_agent / self.slower_ceiling:.2f}x the ceiling",
                 met(self.backup_agent <= CEILING_MARGIN_TARGET * self.slower_ceiling)],
                ["no dump bytes on local disk during backup",
                 disk_size(self.agent_backup_disk), met(self.agent_backup_disk == 0)],
                [f"restore at least {RESTORE_SPEEDUP_TARGET}x faster than the baseline",
                 ratio(self.restore_baseline, self.restore_agent),
                 met(self.restore_baseline >= RESTORE_SPEEDUP_TARGET * self.restore_agent)],
                ["agent peak RSS at most 64 MiB during backup",
                 mebibytes(self.agent_backup_rss),
                 met(self.agent_backup_rss <= AGENT_RSS_TARGET)],
                ["agent peak RSS at most 64 MiB during restore",
                 mebibytes(self.agent_restore_rss),
                 met(self.agent_restore_rss <= AGENT_RSS_TARGET)],
                ["idle heartbeat peak RSS at most 20 MiB", mebibytes(self.heartbeat_rss),
                 met(self.heartbeat_rss <= HEARTBEAT_RSS_TARGET)],
            ],
        )

    def compression_flag(self):
        level = self.ceilings.compression
        return "" if level is None else f"--compress={level} "

    def ceilings_table(self):
        ceilings = self.ceilings
        upload_only = self.upload_only_steps
        return table(
            ["ceiling", "time", "bounds"],
            [
                [f"`pg_dump -Fc {self.compression_flag()}-f /dev/null`, the agent's "
                 f"compression level (first round)", seconds(self.dump_to_null), "backup"],
                ["`pg_dump -Fc -f FILE`, default level 6 (median of the baseline's)",
                 seconds(self.baseline_dump), "baseline backup"],
                [f"`aws s3 cp` upload of the {mebibytes(self.dump_bytes)} dump file "
                 f"(median of the baseline's uploads)", seconds(self.aws_upload), "backup"],
                ["agent backup of the same file, a pg_dump that runs `cat` (first round)",
                 f"{seconds(ceilings.agent_upload_only.wall)}: "
                 f"{upload_only.get('stream', float('nan')):.1f} s upload, "
                 f"{upload_only.get('publish', float('nan')):.1f} s copy to the snapshot "
                 f"key and pointer move", "backup"],
                ["`aws s3 cp` download of the snapshot, default settings (median of the "
                 "baseline's downloads)", seconds(self.aws_download), "restore"],
                ["`aws s3 cp` download of the snapshot in one GET (first round)",
                 seconds(ceilings.aws_single_get_download.wall), "restore"],
                ["a baseline restore whose download is that one GET, against the agent",
                 f"{seconds(self.restore_baseline_single_get)}: "
                 f"{ratio(self.restore_baseline_single_get, self.restore_agent)} the agent's",
                 "restore"],
                ["`pg_restore` with 1 job from a local file (median of the baseline's)",
                 seconds(self.local_restore), "restore"],
            ],
        )

    def steps_table(self):
        steps = self.agent_steps
        names = {
            "stream": "backup: pg_dump streamed into the staging upload",
            "publish": "backup: server-side copy to the snapshot key, check, pointer move",
            "download": "restore: download to the state directory, SHA-256 on the way",
            "pg_restore": "restore: pg_restore (default jobs)",
            "analyze": "restore: ANALYZE",
        }
        return table(
            ["step", "median"],
            [[names[step], seconds(value)] for step, value in steps.items()],
        )

    def rounds_table(self):
        return table(
            ["round", "first", "agent backup", "baseline backup (pg_dump + aws)",
             "agent restore", "baseline restore (aws + pg_restore)"],
            [
                [str(number + 1), "agent" if number % 2 == 0 else "baseline",
                 seconds(r.agent_backup.wall),
                 f"{seconds(r.baseline_backup.total)} ({r.baseline_backup.dump.wall:.1f} + "
                 f"{r.baseline_backup.upload.wall:.1f})",
                 seconds(r.agent_restore.wall),
                 f"{seconds(r.baseline_restore.total)} "
                 f"({r.baseline_restore.download.wall:.1f} + "
                 f"{r.baseline_restore.restore.wall:.1f})"]
                for number, r in enumerate(self.rounds)
            ],
        )


def rounds_description(count):
    if count == 1:
        return "1, the agent first"
    return f"{count}, alternating which side runs first"


def load_average():
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def run(bench, registration, scale_mib, rounds_requested, budget, run_started, command):
    """Runs the default mode and returns its report as Markdown."""
    load_at_start = load_average()
    print(f"generating a {scale_mib} MiB database ...", flush=True)
    bench.dataset = dataset.populate(bench.cluster, SOURCE_DB, scale_mib)
    data = bench.dataset
    print(
        f"database: {mebibytes(data.database_bytes)} on disk, pgbench scale "
        f"{data.pgbench_scale}, {data.blob_rows} random blobs of 256 KiB",
        flush=True,
    )
    bench.wait_for_agent()

    # The heartbeat idles beside the first round, as it idles beside the
    # backups on a host; its memory is read once the round is over.
    heartbeat = bench.start_heartbeat(registration)
    first, ceilings = run_round(bench, 0)
    print_round(0, first)
    heartbeat_rss = bench.finish_heartbeat(heartbeat, registration)
    print(f"idle heartbeat: peak RSS {mebibytes(heartbeat_rss)}", flush=True)
    rounds = [first]
    total_rounds = rounds_requested or rounds_that_fit(
        first.wall - ceilings.wall, time.monotonic() - run_started, budget
    )
    if not rounds_requested and total_rounds < MIN_ROUNDS:
        print(
            f"running only {total_rounds} of {MIN_ROUNDS} rounds, because more do not fit in "
            f"BENCH_BUDGET={budget:.0f}s at this scale (set BENCH_ROUNDS to insist)",
            flush=True,
        )
    for number in range(1, total_rounds):
        result, _ = run_round(bench, number)
        print_round(number, result)
        rounds.append(result)

    summary = Summary(rounds, ceilings, heartbeat_rss)
    settings = {
        "database": f"{mebibytes(data.database_bytes)} on disk: pgbench scale "
                    f"{data.pgbench_scale} and {data.blob_rows} random bytea rows of 256 KiB",
        "dump": f"{mebibytes(summary.dump_bytes)} from the baseline (`pg_dump -Fc`, level 6), "
                f"{mebibytes(bench.last_backup()['size'])} from the agent (level "
                f"{ceilings.compression})",
        "rounds": rounds_description(len(rounds)),
        "agent settings": "defaults (no MATRIX_PART_SIZE, MATRIX_UPLOAD_CONCURRENCY, "
                          "MATRIX_DUMP_COMPRESSION or MATRIX_RESTORE_JOBS); pg_dump "
                          f"compression level {ceilings.compression}",
        "total run time": seconds(time.monotonic() - run_started)
                          + " (installs and build included)",
        "load average (1, 5, 15 min) before the dataset and at the end":
            f"{load_at_start}; {load_average()}",
    }
    return "\n\n".join([
        "## Agent against the shell-script baseline",
        report.preamble(bench.agent, bench.pg_bin, command, settings),
        "### Results", summary.results_table(),
        "### Targets", summary.targets_table(),
        "### Ceilings", summary.ceilings_table(),
        "### Where the agent's time goes", summary.steps_table(),
        "### Rounds", summary.rounds_table(),
    ])
