"""What every LLM backend speaks: `Request`, `Reply`, the `TextGenerator` protocol and
`TextServerError`.

A backend (transformers, vllm, openai) is anything with `format` ("chat" or "completion", resolved
from the model where the recipe says `auto`), `generate(requests) -> replies` (same order, one
reply per request, never raising for one bad request) and `describe()` (what to record per triplet).
Kept apart from `text.llm` (the registry that imports the backends) so that backends import these
types without an import circle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..base.errors import CirgenError


@dataclass
class Request:
    """One generation request: its sampling seed, and `messages` (chat) or `prompt` (completion)."""

    seed: int
    messages: list[dict] | None = None     # chat format
    prompt: str | None = None              # completion format
    schema: dict | None = None             # JSON schema the reply must follow (chat)
    stop: list[str] = field(default_factory=list)


@dataclass
class Reply:
    """One backend reply: the text and finish reason, or an `error` (then no text)."""

    text: str = ""
    finish_reason: str = "stop"            # "stop" or "length" (truncated)
    error: str | None = None               # "server_error" or "timeout": no text at all
    detail: str | None = None              # with `error`: what the server said (status, message)


class TextServerError(CirgenError, RuntimeError):
    """A text server refused in a way no retry fixes (bad request, auth, unknown model), or kept
    failing; the message is one line with the URL, the HTTP status and the server's own words."""


class TextGenerator(Protocol):
    """An LLM text backend (see the module docstring); `format` is "chat" or "completion"."""

    format: str

    def generate(self, requests: list[Request]) -> list[Reply]:
        """One reply per request, in order; a failed request is a `Reply` with `error`. Raises
        `TextServerError` for a failure no retry fixes (the stage stops)."""
        ...

    def describe(self) -> dict:
        """Model and sampling settings recorded per triplet."""
        ...


def prompt_format(configured: str, tokenizer: Callable[[], object]) -> str:
    """`chat` or `completion`: as configured, or for `auto` chat exactly when the model's tokenizer
    (loaded by calling `tokenizer()`, only then) has a chat template."""
    if configured != "auto":
        return configured
    return "chat" if getattr(tokenizer(), "chat_template", None) else "completion"
