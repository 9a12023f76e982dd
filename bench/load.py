"""Load generation: `LoadRun` starts `loadgen.py` processes, releases them together with one GO
line and gathers their per-stream timings; `summarize` turns those into the figures a mode
reports (lost streams, percentiles, wall time, streams open at once)."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.processes import STARTED, spawn, stop_group
from bench.targets import Target

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"


class LoadRun:
    """`procs` load generator processes sharing `n` requests; started together by a GO line."""

    def __init__(
        self,
        target: Target,
        requests: list[str],
        *,
        procs: int = 1,
        concurrency: int = 0,
        stream_timeout: float = 60,
        sse: bool = True,
        digest: bool = False,
        notify_open: bool = False,
        notify_id: bool = False,
        connect_limit: int = 0,
        pause: float = 0.0,
        deadline: float | None = None,
    ) -> None:
        """`pause`: seconds between one request's end and the next one's start on each of the
        `concurrency` lanes; `deadline`: seconds after GO past which no request is started (the
        ones left are recorded with the error "deadline")."""
        n = len(requests)
        procs = max(1, min(procs, n))
        self.n = n
        self.deadline = stream_timeout * (1 if not concurrency else math.ceil(n / concurrency))
        self.deadline = min(self.deadline, stream_timeout + 600) + 5
        if deadline is not None:
            self.deadline = deadline
        self.gens: list[subprocess.Popen] = []
        self.results: list[dict | None] = [None] * procs
        self.opened = [threading.Event() for _ in range(procs)]
        self.ready = [threading.Event() for _ in range(procs)]
        self.ids: list[str] = []  # with notify_id: each response's first event id
        self.id_seen = threading.Event()
        self.readers: list[threading.Thread] = []
        for i in range(procs):
            spec = {
                "host": "127.0.0.1",
                "port": target.port,
                "requests": requests[i::procs],
                "concurrency": concurrency,
                "connect_limit": connect_limit,
                "connect_timeout": 30,
                "stream_timeout": stream_timeout,
                "deadline": self.deadline,
                "sse": sse,
                "digest": digest,
                "notify_open": notify_open,
                "notify_id": notify_id,
                "pause": pause,
            }
            gen = spawn(
                [sys.executable, str(LOADGEN)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            gen.stdin.write(json.dumps(spec) + "\n")
            gen.stdin.flush()
            self.gens.append(gen)
            reader = threading.Thread(target=self._read, args=(i, gen), daemon=True)
            reader.start()
            self.readers.append(reader)
        for ev in self.ready:
            if not ev.wait(30):
                raise RuntimeError("a load generator did not start")
        self.cpu_before = time.process_time()

    def _read(self, i: int, gen: subprocess.Popen) -> None:
        for line in gen.stdout:
            if line.startswith("READY"):
                self.ready[i].set()
            elif line.startswith("OPEN"):
                self.opened[i].set()
            elif line.startswith("ID "):
                self.ids.append(line[3:].strip())
                self.id_seen.set()
            elif line.startswith("RESULT "):
                self.results[i] = json.loads(line[7:])
        self.ready[i].set()
        self.opened[i].set()

    def go(self) -> LoadRun:
        self.t_go = time.monotonic()
        for gen in self.gens:
            gen.stdin.write("GO\n")
            gen.stdin.flush()
        return self

    def wait_open(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        return all(ev.wait(max(0.0, end - time.monotonic())) for ev in self.opened)

    def first_id(self, timeout: float) -> str | None:
        """The first event id any response carried (notify_id), or None after `timeout`."""
        return self.ids[0] if self.id_seen.wait(timeout) else None

    def join(self) -> dict[str, Any]:
        end = time.monotonic() + self.deadline + 15
        for reader in self.readers:
            reader.join(max(0.0, end - time.monotonic()))
        for gen in self.gens:
            stop_group(gen, grace=1)
            with contextlib.suppress(ValueError):
                STARTED.remove(gen)
        streams, fields, cpu, cpu_total = [], None, 0.0, 0.0
        for i, res in enumerate(self.results):
            if res is None:
                raise RuntimeError(f"load generator {i} returned no result (time limit?)")
            fields = res["fields"]
            streams.extend(dict(zip(fields, s, strict=True)) for s in res["streams"])
            cpu += res["cpu_s"]
            cpu_total += res.get("cpu_total_s", res["cpu_s"])
        return {
            "streams": streams,
            "loadgen_cpu_s": cpu,
            "loadgen_cpu_total_s": cpu_total,
            "t_go": self.t_go,
            "t_done": time.monotonic(),
        }


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def max_open(streams: list[dict]) -> int:
    edges = []
    for s in streams:
        if s["t_head"] is not None and s["t_end"] is not None:
            edges += [(s["t_head"], 1), (s["t_end"], -1)]
    edges.sort(key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


def summarize(streams: list[dict]) -> dict[str, Any]:
    ok = [s for s in streams if s["ok"]]
    ttfe = [(s["t_first"] - s["t_start"]) * 1000 for s in streams if s["t_first"] is not None]
    total = [(s["t_end"] - s["t_start"]) * 1000 for s in streams if s["t_end"] is not None]
    conn = [(s["t_connected"] - s["t_start"]) * 1000 for s in streams if s["t_connected"]]
    head = [(s["t_head"] - s["t_start"]) * 1000 for s in streams if s["t_head"]]
    errors = Counter((s["error"] or "unclean_end").split(":")[0] for s in streams if not s["ok"])
    examples = [s["error"] for s in streams if not s["ok"] and s["error"]][:3]
    starts = [s["t_start"] for s in streams]
    ends = [s["t_end"] for s in streams if s["t_end"] is not None]
    return {
        "streams": len(streams),
        "completed": len(ok),
        "lost": len(streams) - len(ok),
        "lost_reasons": dict(errors),
        "lost_examples": examples,
        "ttfe_p50_ms": percentile(ttfe, 50),
        "ttfe_p99_ms": percentile(ttfe, 99),
        "ttfe_max_ms": max(ttfe) if ttfe else None,
        "connect_p50_ms": percentile(conn, 50),
        "connect_p99_ms": percentile(conn, 99),
        "connect_max_ms": max(conn) if conn else None,
        "head_p50_ms": percentile(head, 50),
        "head_p99_ms": percentile(head, 99),
        "total_p50_ms": percentile(total, 50),
        "total_p99_ms": percentile(total, 99),
        "total_max_ms": max(total) if total else None,
        "wall_s": (max(ends) - min(starts)) if ends else None,
        "max_open": max_open(streams),
    }
