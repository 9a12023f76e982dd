"""`python -m dify_proxy.standin`: prints `READY <base url>` once listening, so whoever started
it (scripts/run, the tests, the benchmark) can read its address; SIGTERM/SIGINT end it with
status 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from dify_proxy.standin.server import DEFAULT_API_KEY, serve


def raise_fd_limit() -> None:
    """5000 streams need more descriptors than a default soft limit of 1024."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dify_proxy.standin", description="Local stand-in for Dify's service API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--api-key",
        help=f"the chatflow's key K (default: $STANDIN_API_KEY or {DEFAULT_API_KEY}); "
        "K-workflow, K-completion and K-chat open the workflow, completion and chat apps",
    )
    args = parser.parse_args(argv)
    raise_fd_limit()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready = lambda url: print(f"READY {url}", flush=True)  # noqa: E731
        await serve(args.host, args.port, args.api_key, on_ready=ready, stop=stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
