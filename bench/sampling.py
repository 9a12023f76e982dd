"""Measurements read from /proc: CPU seconds and RSS of a process tree, how busy the whole
machine is, and a thread that keeps a tree's peak RSS (in all and per process) while a phase
runs; and one that keeps the peak of a Redis server's connected clients."""

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
    return sum(tree_rss_by_pid(root).values())


def tree_rss_by_pid(root: int) -> dict[int, int]:
    return {pid: st[2] for pid in tree_pids(root) if (st := proc_stat(pid))}


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
    """Sum of RSS over a process tree every 50 ms, in a thread; keeps the peak, and each
    process's own peak."""

    def __init__(self, root: int, period: float = 0.05) -> None:
        self.root, self.period = root, period
        self.peak = 0
        self.peak_by_pid: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            by_pid = tree_rss_by_pid(self.root)
            self.samples += 1
            self.peak = max(self.peak, sum(by_pid.values()))
            for pid, rss in by_pid.items():
                self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), rss)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def idle_rss(root: int, seconds: float = 0.5) -> int:
    return sum(idle_rss_by_pid(root, seconds).values())


def idle_rss_by_pid(root: int, seconds: float = 0.5) -> dict[int, int]:
    """Each process's median RSS over `seconds` (the tree's processes at the first sample)."""
    samples: dict[int, list[int]] = {pid: [] for pid in tree_pids(root)}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for pid, rss in tree_rss_by_pid(root).items():
            if pid in samples:
                samples[pid].append(rss)
        time.sleep(0.05)
    return {pid: int(statistics.median(s)) for pid, s in samples.items() if s}


class RedisClientsSampler:
    """`connected_clients` from a Redis server's `INFO clients` every 100 ms, in a thread; keeps
    the peak. Its own connection is one of the clients it counts."""

    def __init__(self, url: str, period: float = 0.1) -> None:
        import redis  # the app's requirement; only this sampler needs it

        self.client = redis.Redis.from_url(url, socket_timeout=2)
        self.period = period
        self.peak = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def clients(self) -> int | None:
        try:
            return int(self.client.info("clients")["connected_clients"])
        except Exception:  # noqa: BLE001 - a sample lost, counted; the run goes on
            self.errors += 1
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.clients() or 0)
            self._stop.wait(self.period)

    def __enter__(self) -> RedisClientsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()
