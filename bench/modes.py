"""The load modes, and how one target is measured in each.

`Bench` owns one run's scratch directory and the stand-in of the current mode. Each mode
(`burst`, `hold`, `single`, `healthz`, `firehose`) describes its load and hands it to
`each_target`, which measures the proxy and then the baseline under the same load: a quiet
machine first, a warm-up, then CPU and RSS around the load, and the share of the machine that
other work took meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import profiling
from bench.load import LoadRun, percentile, summarize
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

MODES = ("burst", "hold", "single", "healthz", "firehose")


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

    # -- the modes
    def knobs(self, mode: str, events: int, interval: float) -> tuple[int, float]:
        a = self.args
        return (
            a.events if a.events is not None else events,
            a.interval if a.interval is not None else interval,
        )

    def _streams(self, mode: str, n: int, knobs: dict, timeout: float) -> dict[str, dict]:
        """Open `n` chat streams with `knobs` against each target in turn."""

        def load(t: Target) -> tuple[dict, dict]:
            run = LoadRun(
                t,
                t.chat_requests(knobs, n),
                procs=self.args.procs,
                stream_timeout=timeout,
                connect_limit=self.args.connect_limit,
            )
            return run.go().join(), {}

        return self.each_target(mode, load)

    def burst(self) -> dict[str, Any]:
        n = self.args.streams or 1000
        events, interval = self.knobs("burst", 20, 0.05)
        knobs = {"events": events, "interval": interval}
        res = self._streams("burst", n, knobs, events * interval + 60)
        return {"params": {"streams": n, **knobs}, "targets": res}

    def hold(self) -> dict[str, Any]:
        n = self.args.streams or 5000
        events, interval = self.knobs("hold", 30, 1.0)
        knobs = {"events": events, "interval": interval}
        res = self._streams("hold", n, knobs, events * interval + 90)
        for r in res.values():
            r["rss_per_stream_kb"] = (r["peak_rss"] - r["idle_rss"]) / n / 1024
        return {"params": {"streams": n, **knobs}, "targets": res}

    def single(self) -> dict[str, Any]:
        n = self.args.single_count
        knobs = {"events": 1, "interval": 0.0}

        def load(t: Target) -> tuple[dict, dict]:
            reqs = t.chat_requests(knobs, n)
            return LoadRun(t, reqs, procs=1, concurrency=1, stream_timeout=20).go().join(), {}

        res = self.each_target("single", load)
        return {"params": {"streams": n, "sequential": True, **knobs}, "targets": res}

    def healthz(self) -> dict[str, Any]:
        n = self.args.streams or 1000
        probes = self.args.probes
        events, interval = self.knobs("healthz", 60, 0.5)
        knobs = {"events": events, "interval": interval}
        timeout = events * interval + 90

        def load(t: Target) -> tuple[dict, dict]:
            streams = LoadRun(
                t,
                t.chat_requests(knobs, n),
                procs=self.args.procs,
                stream_timeout=timeout,
                notify_open=True,
                connect_limit=self.args.connect_limit,
            )
            streams.go()
            all_open = streams.wait_open(60)
            open_now = self.standin.open_streams() if self.standin else None
            probe = (
                LoadRun(
                    t,
                    [t.healthz_request()] * probes,
                    procs=1,
                    concurrency=1,
                    stream_timeout=10,
                    sse=False,
                )
                .go()
                .join()
            )
            res = streams.join()
            res["t_go"] = streams.t_go
            res["loadgen_cpu_s"] += probe["loadgen_cpu_s"]
            res["loadgen_cpu_total_s"] += probe["loadgen_cpu_total_s"]
            ps = probe["streams"]
            lat = [(p["t_end"] - p["t_start"]) * 1000 for p in ps if p["ok"]]
            first, last = min(p["t_start"] for p in ps), max(p["t_end"] or 0 for p in ps)

            def open_at(ts: float) -> int:
                return sum(
                    1
                    for s in res["streams"]
                    if s["t_first"] and s["t_first"] <= ts and (s["t_end"] or math.inf) >= ts
                )

            extra = {
                "probes": len(ps),
                "probe_failed": sum(1 for p in ps if not p["ok"]),
                "probe_errors": [p["error"] for p in ps if not p["ok"]][:3],
                "probe_p50_ms": percentile(lat, 50),
                "probe_p99_ms": percentile(lat, 99),
                "probe_max_ms": max(lat) if lat else None,
                "probe_wall_s": last - first,
                "all_streams_open_before_probes": all_open,
                "standin_open_before_probes": open_now,
                "open_at_first_probe": open_at(first),
                "open_at_last_probe": open_at(last),
            }
            return res, extra

        res = self.each_target("healthz", load)
        return {"params": {"streams": n, "probes": probes, **knobs}, "targets": res}

    def firehose(self) -> dict[str, Any]:
        events = self.args.firehose_events
        repeat = self.args.firehose_repeat
        knobs = {"events": events, "interval": 0.0}

        def load(t: Target) -> tuple[dict, dict]:
            reqs = t.chat_requests(knobs, repeat)
            res = (
                LoadRun(t, reqs, procs=1, concurrency=1, stream_timeout=120, digest=True)
                .go()
                .join()
            )
            ss = res["streams"]
            walls = [(s["t_end"] - s["t_start"]) for s in ss if s["ok"]]
            extra = {
                "repeat": repeat,
                "stream_wall_s": walls,
                "median_wall_s": statistics.median(walls) if walls else None,
                "standin_cpu_pct_of_stream_time": None,  # filled in below
                "msg_events": sorted({s["msg_events"] for s in ss}),
                "msg_bytes": sorted({s["msg_bytes"] for s in ss}),
                "data_events": sorted({s["events"] for s in ss}),
                "digests": sorted({s["digest"] for s in ss if s["digest"]}),
            }
            return res, extra

        res = self.each_target("firehose", load)
        for r in res.values():  # the phase has gaps between the streams; this has none
            if r["stream_wall_s"]:
                r["standin_cpu_pct_of_stream_time"] = (
                    100 * r["standin_cpu_s"] / sum(r["stream_wall_s"])
                )
        p, b = res["proxy"], res[self.baseline]
        check = {
            "expected_message_events": events,
            "proxy_message_events": p["msg_events"],
            "baseline_message_events": b["msg_events"],
            "proxy_message_bytes": p["msg_bytes"],
            "baseline_message_bytes": b["msg_bytes"],
            "identical": (
                p["msg_events"] == b["msg_events"] == [events]
                and p["msg_bytes"] == b["msg_bytes"]
                and len(p["msg_bytes"]) == 1
                and p["digests"] == b["digests"]
                and len(p["digests"]) == 1
                and p["lost"] == 0
                and b["lost"] == 0
            ),
        }
        return {
            "params": {"streams": 1, "repeat": repeat, **knobs},
            "targets": res,
            "bytes_check": check,
        }
