"""sserelay.js, the browser client, in headless Chromium against real servers.

- Real connection cuts: the page reaches the server through a TCP proxy the test cuts
  (a clean close, then a reset after the stream's ticket expired). A stream followed
  with sserelay.js, alone or several on one connection, survives both with exactly the
  simulator's text; the README's old snippet, cut once, stops for good.
- Many streams on one page: over HTTP/1.1 a browser opens six connections per host, so
  with one EventSource per stream the seventh and eighth wait, have no reader, and are
  cancelled as orphaned. Through the multiplexed endpoint all eight complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from streaming import GenerationRequest, Message, simulated_text
from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import ServerThread
from tests.support import relay_settings, write_config

pytestmark = pytest.mark.browser


def expected(prompt: str, tokens: int) -> str:
    return simulated_text(GenerationRequest("m", (Message("user", prompt),), tokens), tokens)


class CuttableProxy:
    """A TCP proxy between the browser and the server whose connections the test can
    cut: `cut()` closes both sides of every open connection (`hard`: with a reset)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.server: asyncio.Server | None = None
        self.url = ""
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self.pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.pairs.discard(pair)

    def cut(self, hard: bool = False) -> int:
        """Cut every open connection; returns how many there were."""
        pairs = list(self.pairs)
        for browser_side, server_side in pairs:
            if hard:
                sock = browser_side.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):  # linger 0: close with a reset
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
            browser_side.transport.abort()
            server_side.transport.abort()
        self.pairs.clear()
        return len(pairs)


@pytest.fixture(scope="module")
def relay_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer
) -> Iterator[ServerThread]:
    """Development mode (pages mint their own tokens); tickets live 2 s, so a reconnect
    after a few seconds meets an expired ticket."""
    config = write_config(tmp_path_factory.mktemp("client"), upstream.url, name="client")
    server = ServerThread(relay_settings(config, jwt_secret=None, ticket_ttl_s=2))
    yield server
    server.stop()


@pytest.fixture
async def proxy(relay_server: ServerThread) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(relay_server.port)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    context = await browser.new_context(bypass_csp=True)  # lets tests evaluate JS
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url + "/static/style.css")  # any page of the origin
    return page, errors


# Creates streams and follows them with sserelay.js; what the handlers saw goes to
# window.__out. A handler's `index` must always be where its text goes: no gap, no repeat.
FOLLOW = """async ({prompts, model, tokens, multiplex}) => {
  const { Relay } = await import('/static/sserelay.js');
  const sub = 'client-' + crypto.randomUUID().slice(0, 8);
  const mint = async () => {
    const res = await fetch('/v1/auth/dev-token', {method: 'POST',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify({sub, plan: 'pro'})});
    return (await res.json()).access_token;
  };
  let token = await mint();
  const relay = new Relay({ multiplex,
    getToken: async ({ refresh }) => (refresh ? (token = await mint()) : token) });
  const out = window.__out = { texts: {}, ends: {}, problems: [], done: null };
  const ids = [];
  for (const prompt of prompts) {
    const created = await relay.create({ model, prompt, max_tokens: tokens });
    ids.push(created.id);
    out.texts[created.id] = '';
  }
  const handlers = {
    onDelta: (text, index, id) => {
      if (index !== out.texts[id].length) out.problems.push(`${id}: index ${index}`);
      out.texts[id] += text;
    },
    onDone: (data, id) => { out.ends[id] = { event: 'done', data }; },
    onError: (data, id) => { out.ends[id] = { event: 'error', data }; },
  };
  window.__sub = relay.follow(ids.length === 1 ? ids[0] : ids, handlers);
  window.__sub.done.then((results) => { out.done = results; });
  return ids;
}"""


async def follow(
    page: Page, prompts: list[str], *, model: str, tokens: int, multiplex: bool = True
) -> list[str]:
    ids: list[str] = await page.evaluate(
        FOLLOW, {"prompts": prompts, "model": model, "tokens": tokens, "multiplex": multiplex}
    )
    return ids


async def outcome(page: Page, timeout_ms: int = 30000) -> dict[str, Any]:
    await page.wait_for_function("window.__out.done !== null", timeout=timeout_ms)
    out: dict[str, Any] = await page.evaluate("window.__out")
    out["resumes"] = await page.evaluate("window.__sub.resumes")
    return out


@pytest.mark.parametrize("streams", [1, 3])
async def test_streams_survive_two_real_connection_cuts(
    browser: Browser, proxy: CuttableProxy, streams: int
) -> None:
    page, errors = await open_page(browser, proxy.url)
    seen = events_requests(page)
    renewals: list[str] = []
    page.on("request", lambda r: renewals.append(r.url) if r.url.endswith("/ticket") else None)
    prompts = [f"cut me {i}" for i in range(streams)]
    started = time.monotonic()
    ids = await follow(page, prompts, model="sim-slow", tokens=120)  # 20 tokens/s: 6 s
    grows = "Object.values(window.__out.texts).every((t) => t.length > {n})"
    await page.wait_for_function(grows.format(n=20), timeout=10000)
    assert proxy.cut() >= 1  # a clean close
    await page.wait_for_function(grows.format(n=120), timeout=10000)  # it resumed
    # Tickets live 2 s: the browser's own reconnect now gets a 401 and gives up;
    # sserelay.js renews the tickets and reopens from the last applied events.
    await asyncio.sleep(max(0.0, started + 3.2 - time.monotonic()))
    assert proxy.cut(hard=True) >= 1  # a reset
    out = await outcome(page)
    for stream_id, prompt in zip(ids, prompts, strict=True):
        assert out["ends"][stream_id]["event"] == "done", out["ends"]
        assert out["texts"][stream_id] == expected(prompt, 120)
    assert out["problems"] == []
    assert out["resumes"] >= 2
    assert renewals, "the expired tickets were never renewed"
    assert len(seen) >= 3  # the first connection and at least one after each cut
    if streams > 1:  # every connection carried all of them: no per-stream events URL
        assert all("/v1/events?streams=" in url for url in seen), seen
    assert not errors, errors
    await page.context.close()


async def test_the_old_readme_snippet_stops_at_the_first_cut(
    browser: Browser, proxy: CuttableProxy
) -> None:
    """What sserelay.js fixes: `addEventListener("error", () => es.close())` also
    catches EventSource's own connection-error event, so one dropped connection ends
    the stream for good, text missing."""
    page, errors = await open_page(browser, proxy.url)
    await page.evaluate(
        """async () => {
          const minted = await fetch('/v1/auth/dev-token', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: '{"plan": "pro"}'});
          const token = (await minted.json()).access_token;
          const r = await fetch('/v1/streams', {method: 'POST',
            headers: {authorization: `Bearer ${token}`, 'content-type': 'application/json'},
            body: JSON.stringify({model: 'sim-slow', prompt: 'old snippet', max_tokens: 60})});
          const {events_url} = await r.json();
          const out = window.__old = {text: '', ended: null};
          const es = window.__es = new EventSource(events_url);
          es.addEventListener('delta', (e) => { out.text += JSON.parse(e.data).text; });
          for (const end of ['done', 'error']) {
            es.addEventListener(end, () => { out.ended = end; es.close(); });
          }
        }"""
    )
    await page.wait_for_function("window.__old.text.length > 20", timeout=10000)
    assert proxy.cut() >= 1
    await page.wait_for_timeout(4000)  # the stream itself ends in about 3 s
    old = await page.evaluate("({...window.__old, state: window.__es.readyState})")
    assert old["ended"] == "error" and old["state"] == 2  # CLOSED, by the snippet itself
    full = expected("old snippet", 60)
    assert full.startswith(old["text"]) and len(old["text"]) < len(full)
    assert not errors, errors
    await page.context.close()


@pytest.fixture(scope="module")
def short_grace(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer
) -> Iterator[ServerThread]:
    """Streams nobody reads for 2 s are cancelled as orphaned (15 s by default; the
    streams below take about 4.5 s, as a 20 s stream would against the default)."""
    config = write_config(tmp_path_factory.mktemp("grace"), upstream.url, name="grace")
    server = ServerThread(relay_settings(config, jwt_secret=None, orphan_grace_s=2))
    yield server
    server.stop()


EIGHT = [f"stream number {i}" for i in range(8)]
EIGHT_TOKENS = 90  # sim-slow: 20 tokens/s, about 4.5 s


def events_requests(page: Page) -> list[str]:
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if "/events" in r.url else None)
    return seen


async def test_eight_event_sources_on_one_page_lose_two_streams(
    browser: Browser, short_grace: ServerThread
) -> None:
    """The problem, reproduced: one EventSource per stream. The seventh and eighth wait
    for one of the six connections, nobody reads their streams, and they are cancelled."""
    page, errors = await open_page(browser, short_grace.url)
    seen = events_requests(page)
    ids = await follow(page, EIGHT, model="sim-slow", tokens=EIGHT_TOKENS, multiplex=False)
    out = await outcome(page)
    assert len([u for u in seen if "/v1/streams/" in u]) >= 8  # one connection per stream
    orphaned = [i for i in ids if out["ends"][i]["event"] == "error"]
    assert len(orphaned) == 2, out["ends"]
    for stream_id in orphaned:
        assert out["ends"][stream_id]["data"]["code"] == "orphaned"
        full = expected(EIGHT[ids.index(stream_id)], EIGHT_TOKENS)
        assert full.startswith(out["texts"][stream_id]) and out["texts"][stream_id] != full
    assert not errors, errors
    await page.context.close()


async def test_eight_streams_on_one_page_all_complete_over_one_connection(
    browser: Browser, short_grace: ServerThread
) -> None:
    page, errors = await open_page(browser, short_grace.url)
    seen = events_requests(page)
    ids = await follow(page, EIGHT, model="sim-slow", tokens=EIGHT_TOKENS)
    out = await outcome(page)
    for stream_id, prompt in zip(ids, EIGHT, strict=True):
        assert out["ends"][stream_id]["event"] == "done", out["ends"][stream_id]
        assert out["texts"][stream_id] == expected(prompt, EIGHT_TOKENS)
    assert out["problems"] == []
    assert len(seen) == 1 and "/v1/events?streams=" in seen[0], seen
    assert [r["id"] for r in out["done"]] == ids
    assert not errors, errors
    await page.context.close()
