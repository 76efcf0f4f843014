"""The demo page in headless Chromium against a real server: it streams to 100 %, the
text is exactly the simulator's, and dropped connections resume without loss."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from streaming import GenerationRequest, Message, simulated_text
from streaming.providers import estimate_tokens
from testkit.fake_upstream import FakeUpstreamServer, expected_text
from testkit.servers import ServerThread
from tests.support import relay_settings, write_config

pytestmark = pytest.mark.browser

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


async def test_a_reloaded_page_resumes_where_it_was(page: Page) -> None:
    """sserelay.js keeps each stream's last applied id in sessionStorage: after a reload
    the page resumes from it, under the text it had, and ends with exactly the text."""
    await start(page, "sim-slow", 100)  # about 5 s
    await page.wait_for_function("window.sserelayDemo.state().text.length > 40")
    stream_id = (await state(page))["streamId"]
    resumed: list[str] = []
    page.on("request", lambda r: resumed.append(r.url) if "/events?" in r.url else None)
    await page.reload()
    await page.wait_for_selector("#status[data-state=done]", timeout=20000)
    s = await state(page)
    assert s["streamId"] == stream_id
    assert s["text"] == expected(100) == await page.text_content("#output")
    assert resumed and all("last_event_id=" in url for url in resumed), resumed
    assert await page.text_content("#percent") == "100%"


async def pick_plan(page: Page, plan: str) -> None:
    """Pick a plan; returns once the page has listed that plan's models."""
    async with page.expect_response(lambda r: r.url.endswith("/v1/models")) as models:
        await page.select_option("#plan-select", plan)
    assert (await (await models.value).json())["plan"] == plan
    await page.wait_for_timeout(50)  # the response is in; let the page render it


async def test_plans_subjects_and_reset_durations(browser: Browser, page: Page) -> None:
    # Each tab is its own subject, so tabs (and curl) do not share one rate limit.
    subject = await page.evaluate("sessionStorage.getItem('sserelay.demo.sub')")
    assert subject.startswith("demo-") and len(subject) == 17
    other = await browser.new_context(bypass_csp=True)
    try:
        second = await other.new_page()
        await second.goto(page.url)
        await second.wait_for_function("!document.querySelector('#start').disabled")
        assert await second.evaluate("sessionStorage.getItem('sserelay.demo.sub')") != subject
    finally:
        await other.close()
    # Development mode: the page picks its plan; the models follow.
    assert await page.is_visible("#plan-picker")
    plans = await page.eval_on_selector_all("#plan-select option", "os => os.map(o => o.value)")
    assert plans == ["free", "pro", "demo"]  # the server's default plan is "demo"
    assert await page.input_value("#plan-select") == "demo"
    await pick_plan(page, "free")
    assert await page.eval_on_selector("#model", "s => s.options.length") == 1
    await pick_plan(page, "pro")
    assert await page.eval_on_selector("#model", "s => s.options.length") == 4
    # Reset times read as durations, not raw seconds.
    await pick_plan(page, "demo")
    await start(page, "sim-fast", 5)
    await page.wait_for_selector("#status[data-state=done]", timeout=15000)
    await page.wait_for_function(
        "document.querySelector('#usage-list').textContent.includes('$0.99')"
    )
    usage = await page.eval_on_selector_all("#usage-list li", "ls => ls.map(l => l.textContent)")
    assert any(row.startswith("requests per minute") for row in usage), usage
    for row in usage:
        assert re.search(r"\(resets in \d+ (s|min|h|d)\)$", row), row
    budget = next(row for row in usage if row.startswith("daily budget"))
    assert budget.endswith("(resets in 24 h)"), budget


async def test_favicon_and_feedback_buttons_need_no_emoji_font(page: Page) -> None:
    href = await page.get_attribute("link[rel=icon]", "href")
    assert href == "/static/favicon.svg"
    answer = await page.request.get(page.url.rstrip("/") + href)
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("image/svg+xml")
    for button, label in (("#thumb-up", "Useful"), ("#thumb-down", "Not useful")):
        text = (await page.text_content(button) or "").strip()
        assert text == label
        assert all(ord(c) < 0x2000 for c in text)


async def test_a_provider_drop_is_continued_and_the_page_says_so_discreetly(
    page: Page, upstream: FakeUpstreamServer
) -> None:
    upstream.app.push_faults([{"fault": "drop", "fault_after": 8}])
    await start(page, "claude", 200)
    await page.wait_for_selector("#status[data-state=done]", timeout=15000)
    assert await page.text_content("#output") == expected_text(40)
    assert await page.is_visible("#recovered")
    note = await page.text_content("#recovered") or ""
    assert "upstream_dropped" in note and "claude" in note
    await start(page, "sim-fast", 5)  # the next answer starts without the note
    await page.wait_for_selector("#status[data-state=done]", timeout=15000)
    assert not await page.is_visible("#recovered")
