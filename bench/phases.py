"""One measured phase: a target (the proxy, then the baseline) under one load, with a quiet
machine first, a warm-up, then CPU and RSS sampled around the load and the share of the machine
that other work took meanwhile.

`Bench` owns one run's scratch directory, the stand-in of the current mode and the options;
the modes (modes.py) describe their load and hand it to `each_target`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import profiling
from bench.load import LoadRun, summarize
from bench.processes import log
from bench.sampling import (
    CORES,
    RssSampler,
    idle_rss,
    machine_busy_cpu,
    tree_cpu,
    tree_cpu_by_pid,
    wait_quiet,
)
from bench.targets import Direct, Nginx, Proxy, StandIn, Target


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dify-bench-"))
        self.nginx = None
        if args.baseline == "nginx":
            self.nginx = shutil.which(args.nginx) or shutil.which(
                args.nginx, path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin"
            )
        self.baseline = "nginx" if self.nginx else "direct"
        if args.baseline == "nginx" and not self.nginx:
            log(f"nginx not found ({args.nginx}): falling back to direct-to-stand-in baseline")
        self.standin: StandIn | None = None
        self.proxy_env = dict(item.split("=", 1) for item in args.proxy_env)

    def targets(self) -> list[str]:
        return ["proxy", self.baseline]

    def start_target(self, name: str) -> Target:
        assert self.standin is not None
        if name == "proxy":
            return Proxy(self.standin, self.tmp, self.args.workers, self.proxy_env)
        if name == "nginx":
            return Nginx(self.standin, self.tmp, self.nginx)
        return Direct(self.standin)

    @contextlib.contextmanager
    def mode_standin(self):  # noqa: ANN201
        self.standin = StandIn(self.tmp)
        try:
            yield self.standin
        finally:
            self.standin.stop()
            self.standin = None

    def warm_up(self, target: Target) -> None:
        reqs = target.chat_requests({"events": 3, "interval": 0.0}, 20)
        res = LoadRun(target, reqs, procs=1, stream_timeout=20).go().join()
        bad = [s for s in res["streams"] if not s["ok"]]
        if bad:
            tail = ""
            if isinstance(target, Proxy):
                tail = " | proxy log: " + " / ".join(target.log_lines()[-3:])
            raise RuntimeError(f"{target.name}: warm-up failed: {bad[0]['error']}{tail}"[:600])

    def measure(self, target: Target, load: Any) -> dict[str, Any]:
        """Run `load()` (returns (LoadRun result, extra)) with RSS and CPU accounting around it."""
        assert self.standin is not None
        quiet = wait_quiet(self.args.wait_quiet)
        self.warm_up(target)
        time.sleep(0.3)
        idle = idle_rss(target.root_pid)
        log_before = len(target.log_lines()) if isinstance(target, Proxy) else 0
        si0, tc0 = self.standin.cpu(), tree_cpu(target.root_pid)
        per0 = tree_cpu_by_pid(target.root_pid)
        busy0, tb0 = machine_busy_cpu(), time.monotonic()
        profiler = []
        if self.args.profile and isinstance(target, Proxy):
            profiler = profiling.start(
                target.worker_pids(), Path(self.args.profile), self.current_mode
            )
        with RssSampler(target.root_pid) as sampler:
            result, extra = load()
        si1, tc1 = self.standin.cpu(), tree_cpu(target.root_pid)
        per1 = tree_cpu_by_pid(target.root_pid)
        busy1, tb1 = machine_busy_cpu(), time.monotonic()
        profiling.stop(profiler, self.args.profile_top)
        out = summarize(result["streams"])
        phase = result["t_done"] - result["t_go"]  # load time, without generator start-up
        out.update(
            idle_rss=idle,
            peak_rss=sampler.peak,
            rss_samples=sampler.samples,
            phase_s=phase,
            target_cpu_s=tc1 - tc0,
            # per process of the tree (master first): shows an uneven split between workers
            target_cpu_by_process=[
                round(per1[p] - per0.get(p, 0.0), 2) for p in sorted(per1) if p in per0
            ],
            standin_cpu_s=si1 - si0,
            standin_cpu_pct=100 * (si1 - si0) / phase if phase else None,
            loadgen_cpu_s=result["loadgen_cpu_s"],
            loadgen_cpu_pct=100 * result["loadgen_cpu_s"] / phase if phase else None,
        )
        # whatever else ran on the machine meanwhile (other people's tests, the kernel's share of
        # loopback traffic not charged to a process, this orchestrator): a noisy neighbour
        # shows up here
        gens = result.get("loadgen_cpu_total_s", result["loadgen_cpu_s"])
        other = (busy1 - busy0) - (tc1 - tc0) - (si1 - si0) - gens
        window = tb1 - tb0
        out["other_cpu_s"] = other
        out["machine_busy_pct_before"] = quiet
        out["other_cpu_pct_of_machine"] = 100 * max(other, 0.0) / (window * CORES)
        if isinstance(target, Proxy):
            lines = target.log_lines()[log_before:]
            out["proxy_log_lines"] = len(lines)
            out["proxy_log_sample"] = sorted(
                Counter(line[24:160] for line in lines).items(), key=lambda kv: -kv[1]
            )[:5]
            out["workers"] = len(target.worker_pids())
        out.update(extra)
        return out

    def each_target(self, mode: str, load_for: Any) -> dict[str, dict[str, Any]]:
        results = {}
        with self.mode_standin():
            for name in self.targets():
                target = self.start_target(name)
                try:
                    log(f"{mode}: {name} on 127.0.0.1:{target.port}")
                    results[name] = self.measure(target, lambda t=target: load_for(t))
                finally:
                    target.stop()
                time.sleep(1)  # let the stand-in and the kernel settle between targets
        return results

    def events_and_interval(self, events: int, interval: float) -> tuple[int, float]:
        a = self.args
        return (
            a.events if a.events is not None else events,
            a.interval if a.interval is not None else interval,
        )
