"""The demo page in headless Chromium against a real server: it streams to 100 %, the
text is exactly the simulator's, and dropped connections resume without loss."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from streaming import GenerationRequest, Message, simulated_text
from streaming.providers import estimate_tokens
from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import ServerThread
from tests.support import relay_settings, write_config

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "Explain server-sent events in one paragraph."


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer
) -> Iterator[ServerThread]:
    """Development mode (no key: the page gets its own token), a short ticket life."""
    config = write_config(
        tmp_path_factory.mktemp("demo"),
        upstream.url,
        default_plan="demo",
        extra_plans={"demo": {"requests_per_minute": 100, "daily_budget_usd": 1.0}},
    )
    server = ServerThread(relay_settings(config, jwt_secret=None, ticket_ttl_s=2))
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed (apt-get install -y chromium)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser, demo: ServerThread) -> AsyncIterator[Page]:
    context = await browser.new_context(bypass_csp=True)  # lets tests evaluate JS
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(demo.url + "/")
    await page.wait_for_function(
        "document.querySelector('#start') && !document.querySelector('#start').disabled"
    )
    yield page
    await context.close()
    assert not errors, errors


def expected(tokens: int) -> str:
    return simulated_text(GenerationRequest("m", (Message("user", PROMPT),), tokens), tokens)


async def state(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate("window.sserelayDemo.state()")
    return value


async def start(page: Page, model: str, max_tokens: int) -> None:
    await page.select_option("#model", model)
    await page.fill("#max-tokens", str(max_tokens))
    await page.click("#start")


async def test_streams_to_100_percent_with_the_exact_text(page: Page) -> None:
    await start(page, "sim-fast", 25)
    await page.wait_for_selector("#status[data-state=done]", timeout=15000)
    assert await page.text_content("#output") == expected(25)
    assert await page.text_content("#percent") == "100%"
    assert await page.get_attribute("#progress", "value") == "100"
    cost = (estimate_tokens(len(PROMPT)) * 1.0 + 25 * 5.0) / 1e6  # sim-fast prices
    assert await page.text_content("#cost") == f"${cost:.6f}"
    assert await page.text_content("#tokens") == "25"
    # The usage panel shows what is left, updated after the stream.
    await page.wait_for_selector("#usage:not([hidden])")
    await page.wait_for_function(
        "document.querySelector('#usage-list').textContent.includes('of $1.000000')"
    )
    usage = await page.text_content("#usage-list") or ""
    assert "requests per minute" in usage and "daily budget" in usage
    # Thumbs up on the answer lands on its request record.
    await page.click("#thumb-up")
    await page.wait_for_function(
        "document.querySelector('#feedback-status').textContent === 'Thanks!'"
    )


async def test_a_dropped_connection_resumes_without_loss_or_duplicates(page: Page) -> None:
    await start(page, "sim-slow", 60)  # 20 tokens/s: about 3 s
    await page.wait_for_function("window.sserelayDemo.state().text.length > 20")
    await page.click("#blip")
    await page.wait_for_selector("#conn[data-state=reconnecting]", timeout=5000)
    await page.wait_for_selector("#status[data-state=done]", timeout=20000)
    s = await state(page)
    assert s["text"] == expected(60)
    assert s["resumes"] >= 1


async def test_resumes_after_the_ticket_expired(page: Page) -> None:
    await start(page, "sim-slow", 100)  # about 5 s; tickets live 2 s
    await page.wait_for_function("window.sserelayDemo.state().text.length > 0")
    await page.wait_for_timeout(2600)
    await page.click("#blip")  # reconnects with the now-expired ticket: 401, new ticket
    await page.wait_for_selector("#status[data-state=done]", timeout=20000)
    s = await state(page)
    assert s["text"] == expected(100)
    assert s["resumes"] >= 1


async def test_cancel(page: Page) -> None:
    await start(page, "sim-slow", 200)
    await page.wait_for_function("window.sserelayDemo.state().text.length > 0")
    await page.click("#cancel")
    await page.wait_for_selector("#status[data-state=cancelled]", timeout=10000)
    text = (await state(page))["text"]
    assert text and expected(200).startswith(text) and text != expected(200)


COOKIE_CLIENT_SECRET = "browser-test-client-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def cookie_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer
) -> Iterator[ServerThread]:
    """A configured key (no dev tokens): the page must live on its cookie session."""
    config = write_config(
        tmp_path_factory.mktemp("cookie"), upstream.url, default_plan="pro", name="cookie"
    )
    server = ServerThread(
        relay_settings(
            config,
            auth_client_secret=COOKIE_CLIENT_SECRET,
            ticket_ttl_s=2,
            access_token_ttl_s=3,
        )
    )
    yield server
    server.stop()


async def test_cookie_session_streams_resumes_and_renews(
    browser: Browser, cookie_server: ServerThread
) -> None:
    context = await browser.new_context(bypass_csp=True)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(cookie_server.url + "/static/style.css")  # be on the origin
    # What a same-origin login backend does: obtain the session as HttpOnly cookies.
    status = await page.evaluate(
        """async (secret) => (await fetch('/v1/auth/token', {method: 'POST',
            headers: {'Authorization': 'Bearer ' + secret, 'Content-Type': 'application/json'},
            body: JSON.stringify({sub: 'erin', plan: 'pro', cookie: true})})).status""",
        COOKIE_CLIENT_SECRET,
    )
    assert status == 200
    cookies = {c["name"]: c for c in await context.cookies()}
    assert cookies["sserelay_access"]["httpOnly"] and cookies["sserelay_access"]["secure"]
    assert not await page.evaluate("document.cookie")  # invisible to scripts
    await page.goto(cookie_server.url + "/")
    await page.wait_for_function("!document.querySelector('#start').disabled")
    assert await page.is_hidden("#token-panel")
    await start(page, "sim-slow", 100)  # about 5 s: outlives the 2 s ticket and 3 s token
    await page.wait_for_function("window.sserelayDemo.state().text.length > 0")
    await page.wait_for_timeout(3200)
    await page.click("#blip")  # expired ticket and expired access cookie: both renewed
    await page.wait_for_selector("#status[data-state=done]", timeout=20000)
    s = await state(page)
    assert s["text"] == expected(100) and s["resumes"] >= 1
    await context.close()
    assert not errors, errors
