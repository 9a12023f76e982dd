"""The load modes: what each one sends to every target, and the figures it adds to the common
ones (see bench/README.md for what each mode stands for).

- `burst`: many streams opened at the same moment;
- `hold`: thousands of slow streams held open at once (and RSS per open stream);
- `single`: one stream at a time (the latency the proxy adds);
- `healthz`: GET /healthz while streams are open;
- `firehose`: one stream of back-to-back events (wall time, and the bytes compared with nginx's);
- `resume`: many clients resuming one long live answer, half of them never reading (the proxy
  alone: nginx cannot resume; its baselines are the idle proxy and the answer with no resumers).
"""

from __future__ import annotations

import contextlib
import math
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.load import LoadRun, percentile
from bench.phases import Bench
from bench.sampling import RedisClientsSampler, RssSampler, idle_rss_by_pid, tree_cpu
from bench.targets import Proxy, Target, next_user


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


RESUME_PAD = 10_000  # bytes of padding per answer event: 360 of them make about 3.7 MB, just
# under RESUME_MAX_BYTES (4 MB), so the whole answer stays resumable


def resume(bench: Bench) -> dict[str, Any]:
    """One client asks for a long answer (with event ids); `--resume-at` of the way through it,
    `--resumers` clients resume it from `<stream>-0` as the same user: half read everything,
    half send their request and never read a byte, so the proxy's writes to them back up."""
    n = bench.args.resumers
    events, interval = bench.events_and_interval(360, 0.1)
    knobs = {"events": events, "interval": interval, "pad": RESUME_PAD}
    lasts = events * interval
    readers_n, unread_n = n // 2, n - n // 2
    redis_url = bench.proxy_env.get("REDIS_URL")
    # with Redis, the resumers come back on another instance: what Redis is there for
    elsewhere = (bench.args.resume_on or ("other" if redis_url else "same")) == "other"
    second: list[Proxy] = []

    def load(asked_on: Target) -> tuple[dict, dict]:
        assert isinstance(asked_on, Proxy)
        t = second[0] if second else asked_on  # where the resumers go, and what is measured
        user = next_user()  # a resume is only ever the asker's
        idle = idle_rss_by_pid(t.root_pid)
        redis = RedisClientsSampler(redis_url) if redis_url else None
        redis_idle = redis.clients() if redis else None
        original = LoadRun(
            asked_on,
            [asked_on.chat_request(knobs, user)],
            stream_timeout=lasts + 90,
            digest=True,
            notify_id=True,
        ).go()
        first_id = original.first_id(30)
        if first_id is None:
            raise RuntimeError("resume: the answer sent no event id within 30 s")
        from_id = first_id.rsplit("-", 1)[0] + "-0"
        # late in the answer, so that each resume has most of it to catch up on
        start_at = original.t_go + bench.args.resume_at * lasts
        time.sleep(max(0.0, start_at - 3.0 - time.monotonic()))
        quiet = healthz_probes(t, 3.0).go().join()  # the answer alone: the baseline
        request = t.resume_request(user, from_id)
        readers = LoadRun(
            t, [request] * readers_n, procs=bench.args.procs, stream_timeout=lasts + 60, digest=True
        )
        unread: list[socket.socket] = []
        cpu0 = tree_cpu(t.root_pid)
        with (
            RssSampler(t.root_pid) as rss,
            redis if redis else contextlib.nullcontext(),
            contextlib.ExitStack() as closing,
        ):
            for _ in range(unread_n):
                unread.append(closing.enter_context(send_and_never_read(t.port, request)))
            readers.go()
            remaining = original.t_go + lasts - time.monotonic()
            busy = healthz_probes(t, max(remaining, 3.0)).go().join()
            res = readers.join()
            answer = original.join()
            unread_status = Counter(str(peek_status(s)) for s in unread)
            cpu = tree_cpu(t.root_pid) - cpu0
        time.sleep(2)  # the workers notice the closed sockets
        after = idle_rss_by_pid(t.root_pid)
        workers = sorted(set(t.worker_pids()) & set(idle))
        asked = answer["streams"][0]
        whole = [
            s
            for s in res["streams"]
            if s["ok"] and s["digest"] == asked["digest"] and s["msg_events"] == events
        ]
        replaced = [
            s
            for s in res["streams"]
            if s not in whole and s["status"] == 200 and s["error"] == "no_message_end"
        ]
        for part in (answer, quiet, busy):
            res["loadgen_cpu_s"] += part["loadgen_cpu_s"]
            res["loadgen_cpu_total_s"] += part["loadgen_cpu_total_s"]
        res["t_go"] = readers.t_go
        extra = {
            # the common figures' RSS and CPU are the asker's instance's; these, the resumers'
            "resumed_on_asker_instance": t is asked_on,
            "resumers_instance_cpu_s": cpu,
            "answer_ok": asked["ok"] and asked["msg_events"] == events,
            "answer_error": asked["error"],
            "answer_data_bytes": asked["data_bytes"],
            "answer_wall_s": (asked["t_end"] or 0) - asked["t_start"],
            "workers_rss_idle": [idle[p] for p in workers],
            "workers_rss_peak": [rss.peak_by_pid.get(p, 0) for p in workers],
            "workers_rss_after": [after.get(p, 0) for p in workers],
            "rss_idle": sum(idle.values()),
            "rss_peak": rss.peak,
            "rss_after": sum(after.values()),
            "rss_per_resumer_kb": (rss.peak - sum(idle.values())) / n / 1024,
            "healthz_quiet": probe_figures(quiet),
            "healthz_resumers": probe_figures(busy),
            "redis_clients_idle": redis_idle,
            "redis_clients_peak": redis.peak if redis else None,
            "redis_sample_errors": redis.errors if redis else None,
            "readers_whole": len(whole),
            "readers_204": sum(1 for s in res["streams"] if s["status"] == 204),
            # A resume replaces the same user's earlier resumes of the same answer
            # (MAX_RESUMES_PER_USER's rule: a reconnecting client has left the old one), which
            # end cleanly without the rest; all the readers here are one user's.
            "readers_replaced": len(replaced),
            "readers_other": dict(
                Counter(
                    (s["error"] or "not_identical").split(":")[0]
                    for s in res["streams"]
                    if s not in whole and s not in replaced and s["status"] != 204
                )
            ),
            "unread_status": dict(unread_status),
        }
        return res, extra

    with bench.mode_standin() as standin:
        target = bench.start_target("proxy")
        try:
            if elsewhere:
                second.append(
                    Proxy(
                        standin,
                        bench.tmp,
                        bench.args.workers,
                        bench.proxy_env,
                        secret=target.secret,
                        log_name="gunicorn-resumes.log",
                    )
                )
                bench.warm_up(second[0])
            measured = bench.measure(target, lambda: load(target))
        finally:
            for proxy in (target, *second):
                proxy.stop()
    params = {"resumers": n, "readers": readers_n, "unread": unread_n, **knobs}
    params["resumed_on"] = "another instance" if elsewhere else "the asker's instance"
    params["resume_at_s"] = bench.args.resume_at * lasts
    return {"params": {**params, "redis": bool(redis_url)}, "targets": {"proxy": measured}}


def healthz_probes(t: Target, seconds: float, pause: float = 0.05) -> LoadRun:
    """Sequential GET /healthz, `pause` apart, for `seconds`."""
    n = math.ceil(seconds / pause)
    return LoadRun(
        t,
        [t.healthz_request()] * n,
        concurrency=1,
        stream_timeout=5,
        sse=False,
        pause=pause,
        deadline=seconds,
    )


def probe_figures(res: dict) -> dict[str, Any]:
    sent = [p for p in res["streams"] if p["error"] != "deadline"]  # not past the time given
    lat = [(p["t_end"] - p["t_start"]) * 1000 for p in sent if p["ok"]]
    return {
        "probes": len(sent),
        "failed": sum(1 for p in sent if not p["ok"]),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
    }


@contextlib.contextmanager
def send_and_never_read(port: int, request: str):  # noqa: ANN201
    """A client that sends its request and reads nothing: the proxy's writes fill the socket
    buffers, and then they block."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(request.encode("latin-1"))
        yield sock
    finally:
        sock.close()


def peek_status(sock: socket.socket) -> int | None:
    """The status of the response waiting unread in the socket, leaving it unread."""
    with contextlib.suppress(OSError):
        head = sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT).split()
        if len(head) == 2 and head[1].isdigit():
            return int(head[1])
    return None


MODES: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "burst": burst,
    "hold": hold,
    "single": single,
    "healthz": healthz,
    "firehose": firehose,
    "resume": resume,
}
