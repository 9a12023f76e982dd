"""What a run prints: one table per mode with every figure as a proxy/baseline ratio from the
same run, the notes that qualify a phase (NOISY, a saturated stand-in, lost streams), and the
closing PASS/MISS table against the targets in bench/README.md."""

from __future__ import annotations

from typing import Any


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def figure(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


MB = 1024 * 1024

ROWS: dict[str, list[tuple[str, str, float, int, bool]]] = {
    # label, key, scale, decimals, ratio?
    "common": [
        ("streams completed", "completed", 1, 0, False),
        ("streams lost", "lost", 1, 0, False),
        ("connect p50 ms", "connect_p50_ms", 1, 2, True),
        ("connect p99 ms", "connect_p99_ms", 1, 2, True),
        ("response head p99 ms", "head_p99_ms", 1, 2, True),
        ("TTFE p50 ms", "ttfe_p50_ms", 1, 2, True),
        ("TTFE p99 ms", "ttfe_p99_ms", 1, 2, True),
        ("TTFE max ms", "ttfe_max_ms", 1, 2, True),
        ("wall s", "wall_s", 1, 2, True),
        ("max streams open at once", "max_open", 1, 0, False),
        ("idle RSS MB", "idle_rss", 1 / MB, 1, True),
        ("peak RSS MB", "peak_rss", 1 / MB, 1, True),
        ("target CPU s", "target_cpu_s", 1, 2, True),
        ("stand-in CPU s", "standin_cpu_s", 1, 2, True),
        ("stand-in CPU % of 1 core", "standin_cpu_pct", 1, 0, False),
        ("load generator CPU % of 1 core", "loadgen_cpu_pct", 1, 0, False),
        ("other CPU % of the machine", "other_cpu_pct_of_machine", 1, 0, False),
    ],
    "hold": [("RSS per open stream KB", "rss_per_stream_kb", 1, 1, True)],
    "healthz": [
        ("healthz probes failed", "probe_failed", 1, 0, False),
        ("healthz p50 ms", "probe_p50_ms", 1, 2, True),
        ("healthz p99 ms", "probe_p99_ms", 1, 2, True),
        ("healthz max ms", "probe_max_ms", 1, 2, True),
        ("streams open at first probe", "open_at_first_probe", 1, 0, False),
        ("streams open at last probe", "open_at_last_probe", 1, 0, False),
    ],
    "firehose": [
        ("median stream wall s", "median_wall_s", 1, 3, True),
        ("stand-in CPU % of stream time", "standin_cpu_pct_of_stream_time", 1, 0, False),
    ],
}


def print_resume(res: dict[str, Any]) -> None:
    """The proxy alone (nginx cannot resume): each figure against the same proxy with nothing
    to resume (RSS idle, before the answer) or with the answer and no resumers (/healthz)."""
    p, r = res["params"], res["targets"]["proxy"]
    size = r["answer_data_bytes"] / MB
    print(
        f"\n== resume: 1 live answer ({p['events']} events {p['interval']} s apart, "
        f"{size:.1f} MB), resumed from <stream>-0 {p['resume_at_s']:.0f} s into it by "
        f"{p['resumers']} clients of the same user: "
        f"{p['readers']} read everything, {p['unread']} never read; "
        f"Redis: {'yes' if p['redis'] else 'no'}; resumers on {p['resumed_on']} (measured)"
    )
    print(f"{'':34}{'baseline':>12}{'resumers':>12}{'after close':>13}{'resumers/baseline':>19}")

    def row(label: str, a: Any, b: Any, c: Any = None, nd: int = 1, rated: bool = True) -> None:
        rat = ratio(b, a) if rated and isinstance(a, (int, float)) else None
        shown = figure(rat, 2) + "x" if rat else ""
        print(f"{label:34}{figure(a, nd):>12}{figure(b, nd):>12}{figure(c, nd):>13}{shown:>19}")

    row("RSS MB, master + workers", r["rss_idle"] / MB, r["rss_peak"] / MB, r["rss_after"] / MB)
    for i, idle in enumerate(r["workers_rss_idle"]):
        peak, after = r["workers_rss_peak"][i], r["workers_rss_after"][i]
        row(f"RSS MB, worker {i + 1}", idle / MB, peak / MB, after / MB)
    q, b = r["healthz_quiet"], r["healthz_resumers"]
    row("/healthz p50 ms", q["p50_ms"], b["p50_ms"], nd=2)
    row("/healthz p99 ms", q["p99_ms"], b["p99_ms"], nd=2)
    row("/healthz max ms", q["max_ms"], b["max_ms"], nd=2)
    row("/healthz probes", q["probes"], b["probes"], nd=0, rated=False)
    row("/healthz probes failed", q["failed"], b["failed"], nd=0, rated=False)
    if p["redis"]:
        row("Redis connected_clients, peak", r["redis_clients_idle"], r["redis_clients_peak"], nd=0)
    else:
        row("Redis connected_clients, peak", "n/a", "n/a")
    print(
        "  baselines: RSS of the idle proxy before the answer; /healthz with the answer "
        "streaming and no resumers; Redis clients with the proxy idle (the bench's own "
        "connection is one of them)"
    )
    print(f"{'RSS per resumer KB, (peak-idle)/N':34}{r['rss_per_resumer_kb']:>12,.1f}")
    print(f"{'CPU s while resumed':34}{r['resumers_instance_cpu_s']:>12,.2f}")
    print(
        f"readers: {r['readers_whole']} of {p['readers']} got the whole answer byte-identical to "
        f"the asker's (digest of every data line); {r.get('readers_replaced', 0)} were replaced by "
        f"a newer resume of the same user's; {r['readers_204']} got a 204; other: "
        f"{r['readers_other'] or 'none'}"
    )
    print(f"never-reading clients, status waiting in their socket at close: {r['unread_status']}")
    print(
        f"readers' response head p99 {figure(r['head_p99_ms'], 0)} ms, first event p50/p99 "
        f"{figure(r['ttfe_p50_ms'], 0)}/{figure(r['ttfe_p99_ms'], 0)} ms (the answer lasts "
        f"{figure(r['answer_wall_s'], 1)} s; the asker's stream "
        f"{'whole' if r['answer_ok'] else 'BROKEN: ' + str(r['answer_error'])})"
    )
    if (r.get("other_cpu_pct_of_machine") or 0) > 15:
        print(
            f"  NOISY: other processes used {r['other_cpu_pct_of_machine']:.0f}% of the machine "
            "during the run; its figures are not clean"
        )
    if r.get("proxy_log_lines"):
        print(f"  proxy wrote {r['proxy_log_lines']} log lines, most common:")
        for line, count in r["proxy_log_sample"]:
            print(f"    {count:6d} x {line}")


def print_mode(mode: str, res: dict[str, Any], baseline: str) -> None:
    if mode == "resume":
        print_resume(res)
        return
    p = res["params"]
    if mode in ("burst", "hold"):
        held = "concurrent streams" if mode == "burst" else "streams held open at once"
        desc = f"{p['streams']:,} {held}, {p['events']} events {p['interval']} s apart each"
    elif mode == "single":
        desc = f"{p['streams']} sequential streams x 1 event"
    elif mode == "healthz":
        desc = (
            f"{p['probes']} sequential GET /healthz while {p['streams']:,} streams "
            f"({p['events']} events {p['interval']} s apart) are open"
        )
    else:
        desc = f"1 stream of {p['events']:,} events back to back, {p['repeat']} times in a row"
    print(f"\n== {mode}: {desc}")
    t = res["targets"]
    pr, bl = t["proxy"], t[baseline]
    print(f"{'':34}{'proxy':>12}{baseline:>12}{'proxy/' + baseline:>16}")
    for label, key, scale, nd, with_ratio in ROWS["common"] + ROWS.get(mode, []):
        a, b = pr.get(key), bl.get(key)
        a = a * scale if isinstance(a, (int, float)) and scale != 1 else a
        b = b * scale if isinstance(b, (int, float)) and scale != 1 else b
        r = ratio(a, b) if with_ratio else None
        shown = figure(r, 2) + "x" if r else ""
        print(f"{label:34}{figure(a, nd):>12}{figure(b, nd):>12}{shown:>16}")
    if mode == "single":
        for q in ("p50", "p99"):
            a, b = pr[f"ttfe_{q}_ms"], bl[f"ttfe_{q}_ms"]
            if a is not None and b is not None:
                print(f"{'added TTFE ' + q + ' ms (proxy - ' + baseline + ')':34}{a - b:>12.2f}")
    if mode == "firehose":
        c = res["bytes_check"]
        print(
            f"bytes check: proxy {c['proxy_message_events']} message events / "
            f"{c['proxy_message_bytes']} bytes, {baseline} {c['baseline_message_events']} / "
            f"{c['baseline_message_bytes']}; masked digests equal: "
            f"{'yes' if c['identical'] else 'NO'}"
        )
    for name, r in t.items():
        split = r.get("target_cpu_by_process") or []
        if len(split) > 1:
            print(f"  {name} CPU s per process (by pid, master first): {split}")
        if r.get("lost"):
            print(f"  {name} lost: {r['lost_reasons']}  e.g. {r['lost_examples'][:2]}")
        if (r.get("other_cpu_pct_of_machine") or 0) > 15:
            print(
                f"  NOISY: other processes used {r['other_cpu_pct_of_machine']:.0f}% of the "
                f"machine during the {name} phase; its figures are not clean"
            )
        if r.get("standin_cpu_pct") and r["standin_cpu_pct"] > 85:
            print(
                f"  note: stand-in at {r['standin_cpu_pct']:.0f}% of a core during {name}: "
                "it may be the bottleneck of that phase"
            )
        if r.get("proxy_log_lines"):
            print(f"  proxy wrote {r['proxy_log_lines']} log lines, most common:")
            for line, count in r["proxy_log_sample"]:
                print(f"    {count:6d} x {line}")


def verdicts(results: dict[str, Any], baseline: str) -> list[tuple[str, str, str, bool]]:
    rows = []
    if "burst" in results and "targets" in results["burst"]:
        r = results["burst"]
        p, b = r["targets"]["proxy"], r["targets"][baseline]
        rat = ratio(p["ttfe_p99_ms"], b["ttfe_p99_ms"])
        ok = p["lost"] == 0 and rat is not None and rat <= 2.0
        rows.append(
            (
                "burst",
                f"burst {r['params']['streams']:,}: 0 lost, p99 TTFE <= 2.0x {baseline}",
                f"lost {p['lost']}/{p['streams']}, p99 {figure(p['ttfe_p99_ms'], 1)} ms vs "
                f"{figure(b['ttfe_p99_ms'], 1)} ms = {figure(rat, 2)}x",
                ok,
            )
        )
    if "hold" in results and "targets" in results["hold"]:
        r = results["hold"]
        p = r["targets"]["proxy"]
        kb = p["rss_per_stream_kb"]
        ok = p["lost"] == 0 and kb < 100
        rows.append(
            (
                "hold",
                f"hold {r['params']['streams']:,}: 0 lost, < 100 KB per open stream",
                f"lost {p['lost']}/{p['streams']}, peak {p['peak_rss'] / MB:.0f} MB, "
                f"{kb:.1f} KB/stream",
                ok,
            )
        )
    if "single" in results and "targets" in results["single"]:
        r = results["single"]
        p, b = r["targets"]["proxy"], r["targets"][baseline]
        added = (
            (p["ttfe_p50_ms"] - b["ttfe_p50_ms"])
            if p["ttfe_p50_ms"] is not None and b["ttfe_p50_ms"] is not None
            else None
        )
        added99 = (p["ttfe_p99_ms"] - b["ttfe_p99_ms"]) if added is not None else None
        ok = added is not None and added <= 1.0 and p["lost"] == 0
        rows.append(
            (
                "single",
                f"single: added TTFE <= 1 ms over {baseline} (p50)",
                f"+{figure(added, 2)} ms p50, +{figure(added99, 2)} ms p99",
                ok,
            )
        )
    if "healthz" in results and "targets" in results["healthz"]:
        r = results["healthz"]
        p, b = r["targets"]["proxy"], r["targets"][baseline]
        ok = (
            p["probe_p99_ms"] is not None
            and p["probe_p99_ms"] < 50
            and p["probe_failed"] == 0
            and p["open_at_last_probe"] >= r["params"]["streams"] * 0.99
        )
        rows.append(
            (
                "healthz",
                f"healthz: p99 < 50 ms with {r['params']['streams']:,} streams open",
                f"p99 {figure(p['probe_p99_ms'], 1)} ms ({baseline} "
                f"{figure(b['probe_p99_ms'], 2)} ms), {p['probe_failed']} failed",
                ok,
            )
        )
    if "firehose" in results and "targets" in results["firehose"]:
        r = results["firehose"]
        p, b = r["targets"]["proxy"], r["targets"][baseline]
        rat = ratio(p["median_wall_s"], b["median_wall_s"])
        same = r["bytes_check"]["identical"]
        ok = rat is not None and rat <= 1.5 and same
        rows.append(
            (
                "firehose",
                f"firehose {r['params']['events']:,} events: wall <= 1.5x {baseline}",
                f"{figure(p['median_wall_s'], 3)} s vs {figure(b['median_wall_s'], 3)} s = "
                f"{figure(rat, 2)}x, bytes {'identical' if same else 'DIFFER'}",
                ok,
            )
        )
    if "resume" in results and "targets" in results["resume"]:
        r = results["resume"]
        p = r["targets"]["proxy"]
        kb, p99 = p["rss_per_resumer_kb"], p["healthz_resumers"]["p99_ms"]
        broken = (
            r["params"]["readers"]
            - p["readers_whole"]
            - p.get("readers_replaced", 0)
            - sum(
                count
                for reason, count in p["readers_other"].items()
                if reason.startswith("status_4")
            )
        )
        ok = broken == 0 and p["readers_whole"] > 0 and kb < 500 and p99 is not None and p99 < 50
        rows.append(
            (
                "resume",
                f"resume {r['params']['resumers']}: readers whole, replaced or refused (4xx), "
                "< 500 KB per resumer, healthz p99 < 50 ms",
                f"{p['readers_whole']}/{r['params']['readers']} whole, {p['readers_204']} x 204, "
                f"{kb:,.0f} KB/resumer, p99 {figure(p99, 1)} ms",
                ok,
            )
        )
    for mode, r in results.items():
        if "error" in r:
            rows.append((mode, mode, f"did not finish: {r['error'][:70]}", False))
    return rows


def print_summary(results: dict[str, Any], baseline: str) -> list[dict[str, Any]]:
    rows = []
    for mode, goal, measured, ok in verdicts(results, baseline):
        noise = max(
            (
                t.get("other_cpu_pct_of_machine") or 0
                for t in results[mode].get("targets", {}).values()
            ),
            default=0,
        )
        if noise > 15:
            measured += f" [noisy: {noise:.0f}% other load]"
        rows.append({"mode": mode, "target": goal, "measured": measured, "pass": ok})
    print("\n== summary (every ratio is proxy/" + baseline + " from this run)")
    w1 = max([len(r["target"]) for r in rows] + [10]) + 2
    w2 = max([len(r["measured"]) for r in rows] + [10]) + 2
    print(f"{'target':{w1}}{'measured':{w2}}result")
    for r in rows:
        print(f"{r['target']:{w1}}{r['measured']:{w2}}{'PASS' if r['pass'] else 'MISS'}")
    return rows


# top-level packages that are not the standard library (py-spy shows site-packages paths
