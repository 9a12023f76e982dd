"""The stand-in's HTTP server (aiohttp): Dify's conventions around every `/v1` call, the test-only
`/_standin/*` routes, and the ways to run it (`serve`, `start_in_thread`).

Every `/v1` call is logged before anything else, key checked (a wrong key is Dify's 401; the
key also picks the app, see apps.py), and
any `DifyError` a handler raises, like aiohttp's own 404 and 405, is answered in Dify's error
shape. A chunked request body is refused with 411 (the proxy always sends a length).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from dify_proxy.standin import api, apps, chat, conversation_variables, human_input, workflow
from dify_proxy.standin.records import CALL, RECORDS, Records
from dify_proxy.standin.wire import DifyError, json_response

DEFAULT_API_KEY = "app-standin-dev-key"
API_KEY = web.AppKey("api_key", bytes)
MAX_BODY = 16 * 1024 * 1024
MAX_UPLOAD_BODY = 1024 * 1024 * 1024  # upload bodies are parsed as they arrive, never held
MAX_HEAD_LINE = 64 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
control = web.RouteTableDef()


@web.middleware
async def dify_conventions(request: web.Request, handler: Handler) -> web.StreamResponse:
    upload = request.method == "POST" and request.path in api.UPLOAD_PATHS
    try:
        if "chunked" in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower():
            message = "chunked request bodies are not supported"
            raise DifyError(411, "length_required", message, close=True)
        if (request.content_length or 0) > (MAX_UPLOAD_BODY if upload else MAX_BODY):
            raise DifyError(413, "request_entity_too_large", "body too large", close=True)
        if request.path != "/v1" and not request.path.startswith("/v1/"):
            return await handler(request)
    except DifyError as e:
        return e.response()
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return DifyError(404, "not_found", "The requested URL was not found.").response()
    body = None if upload else await request.read()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    headers = {name.lower(): value for name, value in request.headers.items()}
    scheme, _, token = headers.get("authorization", "").partition(" ")
    mode = apps.mode_of(token.strip().encode(), request.app[API_KEY])
    key_ok = scheme.lower() == "bearer" and mode is not None
    records = request.app[RECORDS]
    call = records.log_call(
        request.method, request.path, request.query_string, headers, key_ok, parsed
    )
    call["app"] = mode if key_ok else None
    request[CALL] = call
    request[apps.MODE] = mode or apps.CHATFLOW
    if upload:
        await api.read_upload(request, call)
    try:
        if not key_ok:
            raise DifyError(401, "unauthorized", "Access token is invalid")
        response = await handler(request)
    except DifyError as e:
        response = e.response()
    except web.HTTPMethodNotAllowed:
        response = DifyError(405, "method_not_allowed", "Method not allowed here.").response()
    except web.HTTPNotFound:
        message = "The requested URL was not found on the server."
        response = DifyError(404, "not_found", message).response()
    if call["status"] is None:
        call["status"] = response.status
    if call["ended_at"] is None:
        call["ended_at"] = time.time()
    return response


@control.get("/_standin/calls")
async def calls(request: web.Request) -> web.Response:
    """Test-only (no key): every `/v1` call since the last reset, as the stand-in saw it."""
    return json_response(request.app[RECORDS].calls)


@control.post("/_standin/reset")
async def reset(request: web.Request) -> web.Response:
    request.app[RECORDS].reset()
    return json_response({"result": "success"})


@control.put("/_standin/recordings/{name}")
async def store_recording(request: web.Request) -> web.Response:
    """Test-only: a recorded stream to replay by name (reset keeps it)."""
    request.app[RECORDS].recordings[request.match_info["name"]] = await request.text()
    return json_response({"result": "success"})


@control.get("/_standin/open")
async def open_streams(request: web.Request) -> web.Response:
    return json_response({"open_streams": request.app[RECORDS].open_streams()})


def create_app(api_key: str) -> web.Application:
    app = web.Application(middlewares=[dify_conventions], client_max_size=MAX_BODY)
    app[API_KEY] = api_key.encode()
    app[RECORDS] = Records()
    tables = (chat.routes, human_input.routes, workflow.routes, conversation_variables.routes)
    for table in (*tables, api.routes, control):
        app.router.add_routes(table)
    return app


def base_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    *,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set (forever without one); `on_ready` gets the base URL when bound.

    The handler of a request whose client leaves is cancelled at once (that is how a silent
    stream notices); on the way out every open stream is cut rather than waited for."""
    app = create_app(api_key or os.environ.get("STANDIN_API_KEY") or DEFAULT_API_KEY)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=0.01,  # 0 would mean: wait for hanging streams forever
        max_line_size=MAX_HEAD_LINE,
        max_field_size=MAX_HEAD_LINE,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=8192)  # a benchmark's connect burst
        await site.start()
        if on_ready is not None:
            on_ready(base_url(host, runner.addresses[0][1]))
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def start_in_thread(
    api_key: str | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[str, Callable[[], None]]:
    """Run the stand-in on its own loop in a daemon thread, for tests that want no subprocess.

    Returns `(base_url, stop)`; `stop()` closes every connection and joins the thread.
    """
    loop, stop, url = asyncio.new_event_loop(), asyncio.Event(), concurrent.futures.Future()

    def run() -> None:
        try:
            loop.run_until_complete(serve(host, port, api_key, on_ready=url.set_result, stop=stop))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            if not url.done():
                url.set_exception(e)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="dify-standin", daemon=True)
    thread.start()

    def stop_thread() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has already ended
            loop.call_soon_threadsafe(stop.set)
        thread.join(10)

    return url.result(timeout=10), stop_thread
