"""Where a generation may be sent: the model asked for, then its fallbacks, each with
its prices and whether it can continue an answer another attempt started."""

from __future__ import annotations

from dataclasses import dataclass

from .providers.base import GenerationRequest, Provider


@dataclass(frozen=True, slots=True)
class Pricing:
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        usd = input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok
        return round(usd / 1_000_000, 8)


@dataclass(frozen=True, slots=True)
class Target:
    """One model a generation may be sent to.

    `prefill`: whether this model can continue a partial answer (it is sent as a final
    assistant message). Set by configuration, never guessed from a provider's refusal:
    a model that cannot is simply never asked to continue."""

    provider: Provider
    request: GenerationRequest
    model: str = ""
    """The public model name (as configured), for the `continued` event and records."""
    pricing: Pricing = Pricing()
    prefill: bool = False
