"""What the process builds at startup is frozen out of the garbage collector's scans."""

from __future__ import annotations

import gc
from pathlib import Path

from app.factory import create_app
from tests.support import relay_settings


async def test_startup_objects_are_frozen(config_path: Path) -> None:
    # Full collections rescanning the startup heap paused every stream for ~80 ms
    # (the bench's resumable p99); frozen objects are not scanned.
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    app = create_app(relay_settings(config_path))
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 10_000
