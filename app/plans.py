"""The plans in force: one small holder that a reload swaps, read by everyone else.

Plans reload without a restart (SIGHUP, the file changing, the admin route); providers
and models keep their running connections, so a reload takes only `plans` and
`default_plan` from the new file. Readers (the token verifier, admission, `/v1/models`)
call `current` each time, so a swap takes effect at once and nobody keeps a stale copy.
"""

from __future__ import annotations

from collections.abc import Collection

from .config import Config


class PlansHolder:
    def __init__(self, config: Config) -> None:
        self._config = config

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
