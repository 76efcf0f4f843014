"""What the process builds at startup is frozen out of the garbage collector's scans,
and what a stream builds is freed when it ends, without it."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from pathlib import Path

import httpx
import pytest

from app.factory import create_app
from testkit.servers import ServerThread
from testkit.sse import collect
from tests.support import auth, relay_settings


async def test_startup_objects_are_frozen(config_path: Path) -> None:
    # Full collections rescanning the startup heap paused every stream for ~80 ms
    # (the bench's resumable p99); frozen objects are not scanned.
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    app = create_app(relay_settings(config_path))
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 10_000


STREAM_TYPES = ("SSEResponse", "Generation", "StreamInfo", "Meter", "RequestResponseCycle")


@pytest.mark.parametrize("route", ["direct", "resumable"])
async def test_a_finished_stream_leaves_no_cyclic_garbage(
    any_relay: ServerThread, client: httpx.AsyncClient, route: str
) -> None:
    # A stream whose objects form a reference cycle is freed by the collector only:
    # every stream's response, generation and connection then waited for a collection,
    # made each of them longer, and under load reached the full ones (20,000 to
    # 38,000 objects each, 10 to 38 ms pauses of every stream on the loop).
    # Freed by reference counting, a finished stream leaves nothing for it to find.
    body = {"model": "sim-fast", "prompt": "no cycles", "max_tokens": 5}
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept, to be looked at
    try:
        for _ in range(3):
            if route == "direct":
                request = client.stream(
                    "POST", any_relay.url + "/v1/chat/stream", json=body, headers=auth()
                )
            else:
                r = await client.post(any_relay.url + "/v1/streams", json=body, headers=auth())
                assert r.status_code == 201, r.text
                request = client.stream("GET", any_relay.url + r.json()["events_url"])
            async with request as response:
                events = await collect(response)
            assert events.events[-1].event == "done"
        await asyncio.sleep(0.5)  # the server settles and records each after its end
        gc.collect()
        found = Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert {name: found[name] for name in STREAM_TYPES if found[name]} == {}
