"""What the load generators talk to: the proxy (gunicorn exactly as the Procfile runs it), nginx
as a bare reverse proxy (the baseline), or the stand-in directly when nginx cannot be had; and
the one Dify stand-in that all of them sit in front of during a mode."""

from __future__ import annotations

import json
import os
import resource
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.processes import free_port, http_get, log, spawn, stop_group, wait_http
from bench.sampling import pid_cpu, tree_pids
from dify_proxy.devtokens import mint

ROOT = Path(__file__).resolve().parents[1]
GUNICORN_BACKLOG = 4096  # `backlog` in gunicorn.conf.py
NGINX_BACKLOG = GUNICORN_BACKLOG  # nginx's listen matches it (nginx's own default is 511)


class StandIn:
    def __init__(self, tmp: Path) -> None:
        self.key = f"app-bench-{secrets.token_hex(8)}"
        # The stand-in's basic chat app (`message` events, `message_end`): the workload the
        # benchmark has always measured, so its figures compare across stand-in versions.
        self.app_key = self.key + "-chat"
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
        self,
        standin: StandIn,
        tmp: Path,
        workers: int,
        extra_env: dict[str, str],
        *,
        secret: str | None = None,
        log_name: str = "gunicorn.log",
    ) -> None:
        """`secret`: another instance's, so that the same users' tokens work on both."""
        super().__init__(standin)
        self.secret = secret or secrets.token_urlsafe(32)
        self.port = free_port()
        self.log_path = tmp / log_name
        if (ROOT / ".env").exists():
            log("note: .env exists; load_dotenv adds its variables that this run does not set")
        env = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "PORT": str(self.port),
            "DIFY_API_KEY": standin.app_key,
            "DIFY_API_URL": standin.url,
            "SUPABASE_JWT_SECRET": self.secret,
            "LOG_LEVEL": "WARNING",
            "WEB_CONCURRENCY": str(workers),
            # A fresh usage ledger per run, as the answer spool is (the default, the checkout's
            # instance/ directory, would grow with every run and carry one run into the next).
            "USAGE_SQLITE_PATH": str(tmp / f"usage-{self.port}.sqlite3"),
            "USAGE_OUTBOX_PATH": str(tmp / f"usage-outbox-{self.port}.sqlite3"),
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
        token = mint(self.secret, sub=user, ttl=4 * 3600)
        return self._post({"message": "bench", "inputs": {"_standin": knobs}}, token)

    def resume_request(self, user: str, last_event_id: str) -> str:
        """What an EventSource sends when it reconnects: a GET with the last id it saw."""
        token = mint(self.secret, sub=user, ttl=4 * 3600)
        return (
            f"GET {self.chat_path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n"
            f"Last-Event-ID: {last_event_id}\r\n\r\n"
        )

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
        return self._post(dify_body(knobs, user), self.standin.app_key)


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
        return self._post(dify_body(knobs, user), self.standin.app_key)

    def stop(self) -> None:  # the stand-in belongs to the mode, not to this target
        pass
