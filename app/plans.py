"""The plans in force: one small holder that a reload swaps, read by everyone else.

Plans reload without a restart (SIGHUP, the file changing, the admin route); providers
and models keep their running connections, so a reload takes only `plans` and
`default_plan` from the new file. Readers (the token verifier, admission, `/v1/models`)
call `current` each time, so a swap takes effect at once and nobody keeps a stale copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from .config import Config

logger = logging.getLogger("sserelay.config")


class PlansHolder:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._listeners: list[Callable[[Config], None]] = []

    def on_apply(self, listener: Callable[[Config], None]) -> None:
        """Call `listener` with the config in force after every reload."""
        self._listeners.append(listener)

    @property
    def current(self) -> Config:
        return self._config

    def names(self) -> Collection[str]:
        return self._config.plans.keys()

    def default_plan(self) -> str:
        return self._config.default_plan

    def apply(self, loaded: Config) -> None:
        """Take plans and the default plan from a reloaded file, keep the rest."""
        self._config = Config.model_validate(
            {
                **self._config.model_dump(),
                "plans": loaded.plans,
                "default_plan": loaded.default_plan,
            }
        )
        for listener in self._listeners:
            try:
                listener(self._config)
            except Exception:  # the new plans are in force: a listener cannot undo that
                logger.exception("after reloading plans")
