"""Measurements read from /proc: CPU seconds and RSS of a process tree, how busy the whole
machine is, and a thread that keeps a tree's peak RSS while a phase runs."""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

from bench.processes import log

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CORES = os.cpu_count() or 1


def proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, cpu seconds user+system, rss bytes) from /proc/<pid>/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15, rss 24
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_rss(root: int) -> int:
    return sum((st[2] for pid in tree_pids(root) if (st := proc_stat(pid))), 0)


def tree_cpu(root: int) -> float:
    return sum((st[1] for pid in tree_pids(root) if (st := proc_stat(pid))), 0.0)


def tree_cpu_by_pid(root: int) -> dict[int, float]:
    return {pid: st[1] for pid in tree_pids(root) if (st := proc_stat(pid))}


def machine_busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_quiet(limit: float, threshold: float = 15.0) -> float:
    """Wait (at most `limit` s) until the machine is under `threshold`% busy over one second,
    since anything else running shares the cores with what is measured; returns the last %."""
    end = time.monotonic() + limit
    while True:
        b0, t0 = machine_busy_cpu(), time.monotonic()
        time.sleep(1.0)
        pct_busy = 100 * (machine_busy_cpu() - b0) / ((time.monotonic() - t0) * CORES)
        if pct_busy < threshold or time.monotonic() >= end:
            if pct_busy >= threshold:
                log(f"machine still {pct_busy:.0f}% busy with other work; measuring anyway")
            return pct_busy


def pid_cpu(pid: int) -> float:
    st = proc_stat(pid)
    return st[1] if st else 0.0


class RssSampler:
    """Sum of RSS over a process tree every 50 ms, in a thread; keeps the peak."""

    def __init__(self, root: int, period: float = 0.05) -> None:
        self.root, self.period = root, period
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss(self.root)
            self.samples += 1
            self.peak = max(self.peak, rss)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def idle_rss(root: int, seconds: float = 0.5) -> int:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(tree_rss(root))
        time.sleep(0.05)
    return int(statistics.median(samples))
