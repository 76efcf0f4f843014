"""A bug in a route answers a problem with the request id, and the keep-alive connection
survives it: the exception stops in the middleware instead of reaching uvicorn (which
would close the connection under the client's next request)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.errors import exception_handlers
from app.middleware import RequestContextMiddleware, SecurityHeadersMiddleware
from testkit.servers import free_socket, wait_http


async def broken(request: Request) -> Response:
    raise RuntimeError("a bug with a secret in its message")


async def fine(request: Request) -> Response:
    return Response("ok")


@pytest.fixture(scope="module")
def buggy() -> Iterator[str]:
    app = Starlette(
        routes=[Route("/broken", broken), Route("/healthz", fine)],
        middleware=[Middleware(SecurityHeadersMiddleware), Middleware(RequestContextMiddleware)],
        exception_handlers=exception_handlers(),
    )
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_http(url, alive=thread.is_alive)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_a_bug_is_a_500_problem_with_the_request_id_on_a_live_connection(buggy: str) -> None:
    with httpx.Client(base_url=buggy, limits=httpx.Limits(max_connections=1)) as client:
        for i in range(50):
            r = client.get("/broken", headers={"x-request-id": f"req-{i}"})
            assert r.status_code == 500
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "internal_error"
            assert "secret" not in r.text and "Traceback" not in r.text
            assert r.headers["x-request-id"] == f"req-{i}"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers.get("connection") != "close"
        assert client.get("/healthz").text == "ok"
