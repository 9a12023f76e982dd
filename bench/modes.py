"""The load modes: what each one sends to every target, and the figures it adds to the common
ones (see bench/README.md for what each mode stands for).

- `burst`: many streams opened at the same moment;
- `hold`: thousands of slow streams held open at once (and RSS per open stream);
- `single`: one stream at a time (the latency the proxy adds);
- `healthz`: GET /healthz while streams are open;
- `firehose`: one stream of back-to-back events (wall time, and the bytes compared with nginx's).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from bench.load import LoadRun, percentile
from bench.phases import Bench
from bench.targets import Target


def streams_against_each_target(
    bench: Bench, mode: str, n: int, knobs: dict, timeout: float
) -> dict[str, dict]:
    """Open `n` chat streams with `knobs` against each target in turn."""

    def load(t: Target) -> tuple[dict, dict]:
        run = LoadRun(
            t,
            t.chat_requests(knobs, n),
            procs=bench.args.procs,
            stream_timeout=timeout,
            connect_limit=bench.args.connect_limit,
        )
        return run.go().join(), {}

    return bench.each_target(mode, load)


def burst(bench: Bench) -> dict[str, Any]:
    n = bench.args.streams or 1000
    events, interval = bench.events_and_interval(20, 0.05)
    knobs = {"events": events, "interval": interval}
    res = streams_against_each_target(bench, "burst", n, knobs, events * interval + 60)
    return {"params": {"streams": n, **knobs}, "targets": res}


def hold(bench: Bench) -> dict[str, Any]:
    n = bench.args.streams or 5000
    events, interval = bench.events_and_interval(30, 1.0)
    knobs = {"events": events, "interval": interval}
    res = streams_against_each_target(bench, "hold", n, knobs, events * interval + 90)
    for r in res.values():
        r["rss_per_stream_kb"] = (r["peak_rss"] - r["idle_rss"]) / n / 1024
    return {"params": {"streams": n, **knobs}, "targets": res}


def single(bench: Bench) -> dict[str, Any]:
    n = bench.args.single_count
    knobs = {"events": 1, "interval": 0.0}

    def load(t: Target) -> tuple[dict, dict]:
        reqs = t.chat_requests(knobs, n)
        return LoadRun(t, reqs, procs=1, concurrency=1, stream_timeout=20).go().join(), {}

    res = bench.each_target("single", load)
    return {"params": {"streams": n, "sequential": True, **knobs}, "targets": res}


def healthz(bench: Bench) -> dict[str, Any]:
    n = bench.args.streams or 1000
    probes = bench.args.probes
    events, interval = bench.events_and_interval(60, 0.5)
    knobs = {"events": events, "interval": interval}
    timeout = events * interval + 90

    def load(t: Target) -> tuple[dict, dict]:
        streams = LoadRun(
            t,
            t.chat_requests(knobs, n),
            procs=bench.args.procs,
            stream_timeout=timeout,
            notify_open=True,
            connect_limit=bench.args.connect_limit,
        )
        streams.go()
        all_open = streams.wait_open(60)
        open_now = bench.standin.open_streams() if bench.standin else None
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

    res = bench.each_target("healthz", load)
    return {"params": {"streams": n, "probes": probes, **knobs}, "targets": res}


def firehose(bench: Bench) -> dict[str, Any]:
    events = bench.args.firehose_events
    repeat = bench.args.firehose_repeat
    knobs = {"events": events, "interval": 0.0}

    def load(t: Target) -> tuple[dict, dict]:
        reqs = t.chat_requests(knobs, repeat)
        res = LoadRun(t, reqs, procs=1, concurrency=1, stream_timeout=120, digest=True).go().join()
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

    res = bench.each_target("firehose", load)
    for r in res.values():  # the phase has gaps between the streams; this has none
        if r["stream_wall_s"]:
            r["standin_cpu_pct_of_stream_time"] = 100 * r["standin_cpu_s"] / sum(r["stream_wall_s"])
    p, b = res["proxy"], res[bench.baseline]
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


MODES: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "burst": burst,
    "hold": hold,
    "single": single,
    "healthz": healthz,
    "firehose": firehose,
}
