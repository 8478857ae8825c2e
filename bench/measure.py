"""Running one command and measuring its wall time, its peak memory and the
peak size of a directory it writes to."""

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

from services import BenchError, stop_process_group

# How often /proc and the watched directory are read. VmHWM is the kernel's
# own high-water mark, so a sample misses only growth in the last interval
# before a process exits.
SAMPLE_INTERVAL = 0.1
MIB = 1 << 20


@dataclass
class Measurement:
    """What one command cost."""

    wall: float
    # VmHWM of every program in the process tree, by program name, in bytes;
    # the maximum over the processes of that name.
    peak_rss_by_program: dict = field(default_factory=dict)
    # The largest sum of VmRSS over the whole tree seen in one sample.
    peak_tree_rss: int = 0
    # GNU time's "Maximum resident set size": the largest peak of the
    # command or any child it waited for, exact rather than sampled.
    time_max_rss: int = 0
    # The largest total size of the files under the watched directory,
    # leaving out the files that `ignore` matches.
    peak_disk: int = 0
    log_path: object = None

    def peak_rss(self, program):
        return self.peak_rss_by_program.get(program, 0)


def _parent_pids():
    """Returns {pid: parent pid} for every process in /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses, so the fields
        # after it are found from the last ')'.
        fields = text[text.rfind(b")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def _tree(root):
    parents = _parent_pids()
    children = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _memory(pid):
    """Returns (program name, VmHWM, VmRSS) in bytes, or None for a process
    that is gone or is a zombie."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
            lines = status.read().splitlines()
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in lines if ":" in line)
    if "VmHWM" not in values:
        return None
    kib = lambda name: int(values[name].split()[0]) * 1024  # noqa: E731
    return values["Name"].strip(), kib("VmHWM"), kib("VmRSS")


def directory_size(path, ignore=None):
    """Returns the total size of the regular files under `path` whose names
    `ignore` does not match."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            if ignore is not None and ignore(name):
                continue
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


class _Sampler(threading.Thread):
    def __init__(self, root_pid, watch_dir, ignore):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.watch_dir = watch_dir
        self.ignore = ignore
        self.stopping = threading.Event()
        self.peak_rss_by_program = {}
        self.peak_tree_rss = 0
        self.peak_disk = 0

    def sample(self):
        tree_rss = 0
        for pid in _tree(self.root_pid):
            memory = _memory(pid)
            if memory is None:
                continue
            name, hwm, rss = memory
            self.peak_rss_by_program[name] = max(self.peak_rss_by_program.get(name, 0), hwm)
            tree_rss += rss
        self.peak_tree_rss = max(self.peak_tree_rss, tree_rss)
        if self.watch_dir is not None:
            self.peak_disk = max(self.peak_disk, directory_size(self.watch_dir, self.ignore))

    def run(self):
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(SAMPLE_INTERVAL)


def _parse_time_max_rss(path):
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    for line in text.splitlines():
        if "Maximum resident set size (kbytes)" in line:
            return int(line.rsplit(":", 1)[1]) * 1024
    return 0


def run_measured(argv, env, log_path, watch_dir=None, ignore=None, timeout=3600):
    """Runs `argv` under /usr/bin/time -v with its output in `log_path`,
    sampling its process tree and the size of `watch_dir` without the files
    that `ignore` matches, and returns a Measurement. Raises BenchError when
    the command fails; the message ends with the log's last lines."""
    time_path = log_path.with_suffix(".time")
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            ["/usr/bin/time", "-v", "-o", str(time_path), *argv],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True,
        )
        sampler = _Sampler(process.pid, watch_dir, ignore)
        sampler.start()
        try:
            status = process.wait(timeout=timeout)
        except BaseException:
            stop_process_group(process, grace=5.0)
            raise
        finally:
            wall = time.monotonic() - started
            sampler.stopping.set()
            sampler.join()
    if status != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise BenchError(
            f"{' '.join(argv[:3])} exited with status {status}; the end of {log_path}:\n"
            + "\n".join(tail)
        )
    return Measurement(
        wall=wall,
        peak_rss_by_program=sampler.peak_rss_by_program,
        peak_tree_rss=sampler.peak_tree_rss,
        time_max_rss=_parse_time_max_rss(time_path),
        peak_disk=sampler.peak_disk,
        log_path=log_path,
    )
