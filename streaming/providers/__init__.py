"""Providers: Anthropic (official SDK), OpenAI-compatible (sserelay's own HTTP/1.1 client
in `_http`), and the simulator."""

from .anthropic import AnthropicProvider
from .base import GenerationRequest, Message, Provider, estimate_tokens
from .openai import OpenAIProvider
from .simulated import SimulatedProvider, simulated_text

__all__ = [
    "AnthropicProvider",
    "GenerationRequest",
    "Message",
    "OpenAIProvider",
    "Provider",
    "SimulatedProvider",
    "estimate_tokens",
    "simulated_text",
]
