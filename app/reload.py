"""Plans reload without a restart: on SIGHUP, or when the config file changes.

A file that fails validation changes nothing: the running plans stay, and the log says
why, so a typo in production never takes the limits down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from .config import ConfigError, load_config
from .plans import PlansHolder

logger = logging.getLogger("sserelay.config")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


async def watch(plans: PlansHolder, path: Path, poll_s: float) -> None:
    """Runs until cancelled. Installs a SIGHUP handler where the loop allows it (the main
    thread); the file check works everywhere."""
    loop = asyncio.get_running_loop()
    hangup = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
        handles_signal = True
    except (RuntimeError, ValueError):  # no signals off the main thread (or on Windows)
        handles_signal = False
    seen = _stamp(path)
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_s):
                    await hangup.wait()
            stamp = _stamp(path)
            if not hangup.is_set() and stamp == seen:
                continue
            hangup.clear()
            seen = stamp
            reload(plans, path)
    finally:
        if handles_signal:
            loop.remove_signal_handler(signal.SIGHUP)


def reload(plans: PlansHolder, path: Path) -> bool:
    try:
        config = load_config(path)
        plans.apply(config)
    except (ConfigError, ValueError) as exc:
        logger.error("config not reloaded, keeping the running plans: %s", exc)
        return False
    logger.info("plans reloaded from %s: %s", path, ", ".join(sorted(config.plans)))
    return True
