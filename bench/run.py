"""Load benchmark: the proxy (gunicorn + gevent, as the Procfile runs it) against nginx as a bare
reverse proxy, both in front of the same local Dify stand-in, on this machine, in one run.

    .venv/bin/python bench/run.py [--mode burst|hold|single|healthz|firehose|all] [--streams N]

(`bench/run` sets up the venv and nginx first.) Every mode starts a fresh stand-in, then the
proxy, measures it, stops it, then nginx, measures it, stops it. Load comes from
bench/loadgen.py processes (asyncio, raw sockets), so no measuring code shares a GIL with the
proxy. Results: text tables on stdout and the same figures as JSON in bench/results/.
Standard library only (plus `dify_proxy.dev.mint_dev_token`, i.e. PyJWT, for the user token).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

from dify_proxy.dev import mint_dev_token  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CORES = os.cpu_count() or 1
GUNICORN_BACKLOG = 4096  # `backlog` in gunicorn.conf.py
NGINX_BACKLOG = GUNICORN_BACKLOG  # nginx's listen matches it (nginx's own default is 511)
MODES = ("burst", "hold", "single", "healthz", "firehose")
TIME_LIMITS = {"burst": 180, "hold": 360, "single": 240, "healthz": 300, "firehose": 240}


class ModeTimeout(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes, /proc


def raise_fd_limit() -> None:
    """Children inherit it: stand-in, gunicorn, nginx and the load generators all get the hard
    limit (the stand-in and the generators also raise their own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


STARTED: list[subprocess.Popen] = []  # every process group this run started, killed at exit


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)  # own process group
    STARTED.append(proc)
    return proc


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    """Signal the process, wait, then SIGKILL its whole group (it was started as its leader)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def stop_all() -> None:
    for proc in reversed(STARTED):
        stop_group(proc, grace=3)
    STARTED.clear()


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, proc: subprocess.Popen, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port, path, timeout=1)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {path} within {seconds} s")


# --------------------------------------------------------------------------- the three servers


class StandIn:
    def __init__(self, tmp: Path) -> None:
        self.key = f"app-bench-{secrets.token_hex(8)}"
        self.proc = spawn(
            [sys.executable, "-m", "dify_proxy.standin", "--port", "0", "--api-key", self.key],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(tmp / "standin.log", "ab"),  # noqa: SIM115 - closed with the process
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY "):
            raise RuntimeError(f"stand-in did not start: {line!r}")
        self.url = line.split()[1]  # http://127.0.0.1:PORT/v1
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def cpu(self) -> float:
        return pid_cpu(self.proc.pid)

    def open_streams(self) -> int:
        return json.loads(http_get(self.port, "/_standin/open")[1])["open_streams"]

    def stop(self) -> None:
        stop_group(self.proc)


class Target:
    """One thing the load generator talks to: the proxy, nginx, or the stand-in directly."""

    name = ""
    chat_path = "/api/chat"
    healthz_path = "/healthz"
    port = 0
    proc: subprocess.Popen

    def __init__(self, standin: StandIn) -> None:
        self.standin = standin

    @property
    def root_pid(self) -> int:
        return self.proc.pid

    def chat_requests(self, knobs: dict[str, Any], n: int) -> list[str]:
        """n requests for the same stand-in scenario, each as a different user: the proxy limits
        streams and requests per user, and the benchmark stands for n people, not one."""
        return [self.chat_request(knobs, next_user()) for _ in range(n)]

    def chat_request(self, knobs: dict[str, Any], user: str) -> str:
        raise NotImplementedError

    def _post(self, body: dict[str, Any], token: str) -> str:
        raw = json.dumps(body, separators=(",", ":"))
        return (
            f"POST {self.chat_path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(raw.encode())}\r\n\r\n{raw}"
        )

    def healthz_request(self) -> str:
        return (
            f"GET {self.healthz_path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Connection: close\r\n\r\n"
        )

    def stop(self) -> None:
        stop_group(self.proc)


_USERS = iter(range(1, 1 << 40))


def next_user() -> str:
    """A user id (uuid-shaped, like Supabase's `sub`) never used before in this run."""
    return str(uuid.UUID(int=(0xBE7C << 112) | next(_USERS), version=4))


def dify_body(knobs: dict[str, Any], user: str) -> dict[str, Any]:
    return {
        "query": "bench",
        "inputs": {"_standin": knobs},
        "user": user,
        "response_mode": "streaming",
    }


class Proxy(Target):
    name = "proxy"

    def __init__(
        self, standin: StandIn, tmp: Path, workers: int, extra_env: dict[str, str]
    ) -> None:
        super().__init__(standin)
        self.secret = secrets.token_urlsafe(32)
        self.port = free_port()
        self.log_path = tmp / "gunicorn.log"
        if (ROOT / ".env").exists():
            log("note: .env exists; load_dotenv adds its variables that this run does not set")
        env = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "PORT": str(self.port),
            "DIFY_API_KEY": standin.key,
            "DIFY_API_URL": standin.url,
            "SUPABASE_JWT_SECRET": self.secret,
            "LOG_LEVEL": "WARNING",
            "WEB_CONCURRENCY": str(workers),
            **extra_env,  # --proxy-env, for experiments only
        }
        # exactly the Procfile's command (it binds 0.0.0.0:$PORT; the benchmark only ever
        # connects to 127.0.0.1); `gunicorn` resolves to the venv's through PATH
        self.command = ["gunicorn", "app:app", "--config", "gunicorn.conf.py"]
        with open(self.log_path, "ab") as logf:
            self.proc = spawn(
                self.command, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT
            )
        wait_http(self.port, "/healthz", self.proc, "gunicorn")
        deadline = time.monotonic() + 10  # wait for every worker to have booted
        while len(self.worker_pids()) < workers and time.monotonic() < deadline:
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        return [p for p in tree_pids(self.proc.pid) if p != self.proc.pid]

    def chat_request(self, knobs: dict[str, Any], user: str) -> str:
        token = mint_dev_token(self.secret, sub=user, ttl=4 * 3600)
        return self._post({"message": "bench", "inputs": {"_standin": knobs}}, token)

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []


NGINX_CONF = """\
daemon off;
worker_processes auto;
worker_rlimit_nofile {nofile};
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream standin {{
        server 127.0.0.1:{standin_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        location = /api/chat {{
            proxy_pass http://standin/v1/chat-messages;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_set_header Connection "";
            proxy_read_timeout 120s;
        }}
        location = /healthz {{
            default_type application/json;
            return 200 '{{"status":"ok"}}';
        }}
    }}
}}
"""


class Nginx(Target):
    name = "nginx"

    def __init__(self, standin: StandIn, tmp: Path, binary: str) -> None:
        super().__init__(standin)
        self.port = free_port()
        self.dir = tmp / "nginx"
        self.dir.mkdir(exist_ok=True)
        os.chmod(tmp, 0o755)  # nginx's workers run as `nobody` when started by root
        os.chmod(self.dir, 0o755)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf = NGINX_CONF.format(
            tmp=self.dir,
            standin_port=standin.port,
            port=self.port,
            backlog=NGINX_BACKLOG,
            nofile=nofile if nofile != resource.RLIM_INFINITY else 65536,
        )
        (self.dir / "nginx.conf").write_text(conf)
        self.command = [binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")]
        self.command[1:1] = ["-e", str(self.dir / "error.log")]
        with open(self.dir / "stderr.log", "ab") as logf:
            self.proc = spawn(self.command, stdout=logf, stderr=subprocess.STDOUT)
        wait_http(self.port, "/healthz", self.proc, "nginx")

    def chat_request(self, knobs: dict[str, Any], user: str) -> str:
        # nginx does no auth: the body is already Dify's and the header has the stand-in's key
        return self._post(dify_body(knobs, user), self.standin.key)


class Direct(Target):
    """Fallback baseline when nginx cannot be had: the stand-in itself."""

    name = "direct"
    chat_path = "/v1/chat-messages"
    healthz_path = "/_standin/open"

    def __init__(self, standin: StandIn) -> None:
        super().__init__(standin)
        self.port = standin.port
        self.proc = standin.proc

    def chat_request(self, knobs: dict[str, Any], user: str) -> str:
        return self._post(dify_body(knobs, user), self.standin.key)

    def stop(self) -> None:  # the stand-in belongs to the mode, not to this target
        pass


# --------------------------------------------------------------------------- load generation


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
        connect_limit: int = 0,
    ) -> None:
        n = len(requests)
        procs = max(1, min(procs, n))
        self.n = n
        self.deadline = stream_timeout * (1 if not concurrency else math.ceil(n / concurrency))
        self.deadline = min(self.deadline, stream_timeout + 600) + 5
        self.gens: list[subprocess.Popen] = []
        self.results: list[dict | None] = [None] * procs
        self.opened = [threading.Event() for _ in range(procs)]
        self.ready = [threading.Event() for _ in range(procs)]
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
            }
            gen = spawn(
                [sys.executable, str(BENCH / "loadgen.py")],
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


def pct(values: list[float], p: float) -> float | None:
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
        "ttfe_p50_ms": pct(ttfe, 50),
        "ttfe_p99_ms": pct(ttfe, 99),
        "ttfe_max_ms": max(ttfe) if ttfe else None,
        "connect_p50_ms": pct(conn, 50),
        "connect_p99_ms": pct(conn, 99),
        "connect_max_ms": max(conn) if conn else None,
        "head_p50_ms": pct(head, 50),
        "head_p99_ms": pct(head, 99),
        "total_p50_ms": pct(total, 50),
        "total_p99_ms": pct(total, 99),
        "total_max_ms": max(total) if total else None,
        "wall_s": (max(ends) - min(starts)) if ends else None,
        "max_open": max_open(streams),
    }


# --------------------------------------------------------------------------- one measured phase


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
        profiler = self.start_profiler(target)
        with RssSampler(target.root_pid) as sampler:
            result, extra = load()
        si1, tc1 = self.standin.cpu(), tree_cpu(target.root_pid)
        per1 = tree_cpu_by_pid(target.root_pid)
        busy1, tb1 = machine_busy_cpu(), time.monotonic()
        self.stop_profiler(profiler)
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

    # -- optional profiling (py-spy is not a dependency of the benchmark)
    def start_profiler(self, target: Target) -> list[tuple[subprocess.Popen, Path]]:
        if not self.args.profile or not isinstance(target, Proxy):
            return []
        pyspy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if not pyspy:
            log("--profile: py-spy not found (pip install py-spy into the venv); not profiling")
            return []
        out_dir = Path(self.args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        profs = []
        for pid in target.worker_pids():
            path = out_dir / f"{self.current_mode}-worker{pid}.txt"
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

    def stop_profiler(self, profs: list[tuple[subprocess.Popen, Path]]) -> None:
        for proc, _ in profs:
            stop_group(proc, sig=signal.SIGINT, grace=20)
        if profs:
            print_profile([p for _, p in profs], self.args.profile_top)

    # ----------------------------------------------------------------------- modes
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
                "probe_p50_ms": pct(lat, 50),
                "probe_p99_ms": pct(lat, 99),
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


# --------------------------------------------------------------------------- reporting


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v: Any, nd: int = 1) -> str:
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


def print_mode(mode: str, res: dict[str, Any], baseline: str) -> None:
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
        print(f"{label:34}{fmt(a, nd):>12}{fmt(b, nd):>12}{fmt(r, 2) + 'x' if r else '':>16}")
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
                f"lost {p['lost']}/{p['streams']}, p99 {fmt(p['ttfe_p99_ms'], 1)} ms vs "
                f"{fmt(b['ttfe_p99_ms'], 1)} ms = {fmt(rat, 2)}x",
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
                f"+{fmt(added, 2)} ms p50, +{fmt(added99, 2)} ms p99",
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
                f"p99 {fmt(p['probe_p99_ms'], 1)} ms ({baseline} "
                f"{fmt(b['probe_p99_ms'], 2)} ms), {p['probe_failed']} failed",
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
                f"{fmt(p['median_wall_s'], 3)} s vs {fmt(b['median_wall_s'], 3)} s = "
                f"{fmt(rat, 2)}x, bytes {'identical' if same else 'DIFFER'}",
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
# relative to site-packages, so `gevent/hub.py` but also stdlib `json/decoder.py`)
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


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--mode", choices=(*MODES, "all"), default="all")
    ap.add_argument(
        "--streams", type=int, help="streams for burst (1000), hold (5000), healthz (1000)"
    )
    ap.add_argument(
        "--events", type=int, help="events per stream for burst/hold/healthz (20 / 30 / 60)"
    )
    ap.add_argument(
        "--interval",
        type=float,
        help="seconds between events for burst/hold/healthz (0.05 / 1.0 / 0.5)",
    )
    ap.add_argument("--single-count", type=int, default=200)
    ap.add_argument("--probes", type=int, default=200, help="healthz probes")
    ap.add_argument("--firehose-events", type=int, default=20000)
    ap.add_argument("--firehose-repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=CORES, help="WEB_CONCURRENCY")
    ap.add_argument("--procs", type=int, default=CORES, help="load generator processes")
    ap.add_argument(
        "--connect-limit",
        type=int,
        default=0,
        help="max connects in progress per generator (0: none)",
    )
    ap.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the proxy (experiments; not the Procfile's)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="SECONDS",
        help="before each phase, wait up to this long for other work on the "
        "machine to stop (under 15%% busy)",
    )
    ap.add_argument("--baseline", choices=("nginx", "direct"), default="nginx")
    ap.add_argument("--nginx", default="nginx", help="nginx binary")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="run py-spy (if installed) on each gunicorn worker during the proxy "
        "phase; raw stacks go to DIR and a top list is printed",
    )
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--results", default=str(BENCH / "results"))
    ap.add_argument("--keep-tmp", action="store_true")
    return ap.parse_args(argv)


def environment(bench: Bench) -> dict[str, Any]:
    env: dict[str, Any] = {
        "cores": CORES,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "gunicorn_backlog": GUNICORN_BACKLOG,
        "nginx_backlog": NGINX_BACKLOG,
        "baseline": bench.baseline,
        "web_concurrency": bench.args.workers,
        "worker_connections": int(os.environ.get("WORKER_CONNECTIONS", "5000")),
        "loadgen_procs": bench.args.procs,
        "proxy_env_extra": bench.proxy_env,
    }
    for name in ("somaxconn",):
        with contextlib.suppress(OSError):
            env[name] = int(Path(f"/proc/sys/net/core/{name}").read_text())
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # read-only: what was measured
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "--",
                "dify_proxy",
                "app.py",
                "gunicorn.conf.py",
                "requirements.txt",
            ],
            capture_output=True,
            text=True,
        )
        env["git_head"] = head.stdout.strip()
        env["app_files_changed_since_head"] = dirty.stdout.split("\n")[:50]
    if bench.nginx:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([bench.nginx, "-v"], capture_output=True, text=True, timeout=5)
            env["nginx"] = out.stderr.strip()
    for dist in (
        "gunicorn",
        "gevent",
        "greenlet",
        "flask",
        "werkzeug",
        "requests",
        "urllib3",
        "pyjwt",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[dist] = importlib.metadata.version(dist)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    bench = Bench(args)
    modes = list(MODES) if args.mode == "all" else [args.mode]

    def on_alarm(_s: int, _f: Any) -> None:
        raise ModeTimeout("hard time limit reached")

    def on_term(signum: int, _f: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGALRM, on_alarm)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGINT too: a background job
        signal.signal(sig, on_term)  # inherits it ignored, and then Ctrl-C would do nothing
    env = environment(bench)
    print(
        f"dify-proxy load benchmark: {', '.join(modes)}; proxy = gunicorn app:app "
        f"--config gunicorn.conf.py, {args.workers} gevent workers (WEB_CONCURRENCY), "
        f"backlog {GUNICORN_BACKLOG} (gunicorn.conf.py); baseline = {bench.baseline}; "
        f"{args.procs} load generator processes; {CORES} cores"
    )
    if bench.proxy_env:
        print(f"NOTE: extra proxy environment (not the Procfile's): {bench.proxy_env}")
    if bench.baseline == "direct":
        why = "--baseline direct" if args.baseline == "direct" else "nginx is not available"
        print(
            f"NOTE: {why}, so the baseline is the Dify stand-in itself (direct, no reverse "
            "proxy in between); its RSS and CPU are the stand-in's, and its healthz is the "
            "stand-in's GET /_standin/open."
        )
    results: dict[str, Any] = {}
    started = dt.datetime.now()
    try:
        for mode in modes:
            bench.current_mode = mode
            limit = TIME_LIMITS[mode] + 2 * math.ceil(args.wait_quiet)  # + waits for quiet
            log(f"mode {mode} (time limit {limit} s)")
            signal.alarm(limit)
            try:
                results[mode] = getattr(bench, mode)()
                print_mode(mode, results[mode], bench.baseline)
            except (ModeTimeout, RuntimeError) as exc:
                results[mode] = {"error": str(exc)}
                print(f"\n== {mode}: FAILED: {exc}")
            except KeyboardInterrupt as exc:
                results[mode] = {"error": f"interrupted ({exc})"}
                raise
            finally:
                signal.alarm(0)
                stop_all()
            sys.stdout.flush()
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc}); stopping everything")
    finally:
        signal.alarm(0)
        stop_all()
        if not args.keep_tmp:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        else:
            log(f"kept {bench.tmp}")
    summary = print_summary(results, bench.baseline)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{started.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "started": started.isoformat(timespec="seconds"),
                "argv": sys.argv,
                "environment": env,
                "results": results,
                "summary": summary,
            },
            indent=1,
            default=str,
        )
    )
    print(f"\nresults: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if all(row["pass"] for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
