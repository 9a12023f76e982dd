"""The optional profile (`--profile DIR`): py-spy on each gunicorn worker during the proxy's
phase, summarised as the top functions and the share of samples per component. py-spy is not
a dependency of the benchmark; without it there is no profile and the run says so."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.processes import log, spawn, stop_group


def start(worker_pids: list[int], out_dir: Path, mode: str) -> list[tuple[subprocess.Popen, Path]]:
    """One py-spy per worker, recording raw stacks to `out_dir` until `stop`."""
    pyspy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if not pyspy:
        log("--profile: py-spy not found (pip install py-spy into the venv); not profiling")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    profs = []
    for pid in worker_pids:
        path = out_dir / f"{mode}-worker{pid}.txt"
        cmd = [
            pyspy,
            "record",
            "--format",
            "raw",
            "--function",
            "--nonblocking",
            "--rate",
            "200",
            "-o",
            str(path),
            "--pid",
            str(pid),
        ]
        profs.append((spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path))
    time.sleep(0.5)  # let py-spy attach before the load starts
    return profs


def stop(profs: list[tuple[subprocess.Popen, Path]], top: int) -> None:
    for proc, _ in profs:
        stop_group(proc, sig=signal.SIGINT, grace=20)
    if profs:
        print_profile([p for _, p in profs], top)


THIRD_PARTY = {
    "flask",
    "werkzeug",
    "requests",
    "urllib3",
    "jwt",
    "gunicorn",
    "gevent",
    "greenlet",
    "flask_limiter",
    "limits",
    "flask_cors",
    "dify_proxy",
    "prometheus_client",
    "cryptography",
    "itsdangerous",
    "jinja2",
    "markupsafe",
    "blinker",
    "charset_normalizer",
    "idna",
    "certifi",
    "dotenv",
    "redis",
    "zope",
    "app.py",
}


def _package(frame: str) -> str:
    """`SocketMixin.send (gevent/_socketcommon.py:712)` -> `gevent`; stdlib -> `stdlib`."""
    start = frame.rfind("(")
    path = frame[start + 1 :].rstrip(")").rsplit(":", 1)[0] if start >= 0 else ""
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    top = path.split("/", 1)[0]
    return top if top in THIRD_PARTY else "stdlib"


def print_profile(paths: list[Path], top: int) -> None:
    """Summarise py-spy raw (collapsed) stacks: own and inclusive samples per function, and
    samples per component (the innermost frame that is neither gevent nor the stdlib, so a
    socket write is charged to whoever wrote: gunicorn, urllib3 or the relay)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    comp: Counter[str] = Counter()
    total = 0
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [f for f in stack.split(";") if f and "(" in f]
            if not frames:
                continue
            total += n
            own[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
            owner = "gevent hub / greenlet switching"
            for f in reversed(frames):
                pkg = _package(f)
                if pkg not in ("gevent", "greenlet", "stdlib"):
                    owner = pkg
                    break
            else:
                if any(_package(f) == "stdlib" for f in frames) and not any(
                    _package(f) == "gevent" for f in frames
                ):
                    owner = "stdlib"
            comp[owner] += n
    if not total:
        print("\n(profile: no samples)")
        return
    print(
        f"\n== profile of the proxy's workers (py-spy): {total} samples on CPU "
        f"({', '.join(p.name for p in paths)})"
    )
    print(f"top {top} functions by own time:")
    for f, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print(f"top {top} functions by inclusive time:")
    for f, n in incl.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("samples by component (innermost frame outside gevent and the stdlib):")
    for c, n in comp.most_common():
        print(f"  {100 * n / total:5.1f}%  {c}")
