"""The LLM backend registry (`load_generator`) and what the pipeline builds on a backend:
`LLMEditor` for the edits stage (the caption writer lives in `datagen.text.sources`).

Each request carries its own seed, derived from the candidate, so a candidate's text does not
depend on which batch it was in (up to the numerics of batched kernels). The request/reply types
and the backend protocol live in `text.protocol`.
"""
from __future__ import annotations


import numpy as np

from ..candidate import Candidate
from .prompt import (EDIT_SCHEMA, END, Limits, edit_messages, edit_prompt, load_edit_examples,
                     parse_edit, pick_examples)
from .protocol import Reply, Request, TextGenerator, TextServerError  # noqa: F401 (re-exported)

RAW_KEEP = 400   # characters of a rejected reply kept in the rejects shard, for debugging


def load_generator(backend: str, cfg) -> TextGenerator:
    """The backend named `backend` for an `LLMConfig`; heavy imports happen inside the backend.
    Raises ValueError for a name other than transformers, vllm or openai."""
    if backend == "transformers":
        from .hf_backend import TransformersGenerator
        return TransformersGenerator(cfg)
    if backend == "vllm":
        from .vllm_backend import VLLMGenerator
        return VLLMGenerator(cfg)
    if backend == "openai":
        from .openai_backend import OpenAIGenerator
        return OpenAIGenerator(cfg)
    raise ValueError(f"unknown LLM backend {backend!r}; known: transformers, vllm, openai")


def request_seed(rng: np.random.Generator) -> int:
    """A request's sampling seed in [0, 2^31 - 1) from the candidate's rng."""
    return int(rng.integers(2**31 - 1))


def make_request(fmt: str, seed: int, messages: list[dict], prompt: str, schema: dict,
                 stop: list[str], structured: bool = True) -> Request:
    """A `Request` in format `fmt`: "chat" sends `messages` (with `schema` when `structured`), any
    other format sends `prompt` with the `stop` strings."""
    if fmt == "chat":
        return Request(seed, messages=messages, schema=schema if structured else None)
    return Request(seed, prompt=prompt, stop=stop)


class LLMEditor:
    """Edits stage: caption -> (instruction, edited caption) with any LLM backend.

    Every candidate gets exactly one outcome: its fields, or a counted reject reason
    (text_malformed / text_empty / text_too_long / text_noop / text_truncated /
    text_reasoning_unclosed / text_ambiguous / text_server_error / text_timeout); a server
    error's own words are kept in `generator["edits"]["error"]`. A `TextServerError` from the
    backend (a request no retry can fix) stops the stage."""

    def __init__(self, recipe, generator: TextGenerator | None = None):
        cfg = recipe.edits
        self.name = cfg.backend
        self.cfg = cfg.llm
        self.gen = generator if generator is not None else load_generator(cfg.backend, cfg.llm)
        self.examples = load_edit_examples(cfg.examples_file)
        self.limits = Limits(cfg.max_instruction_words, cfg.max_caption_words)

    def _request(self, c: Candidate, rng: np.random.Generator, fmt: str) -> tuple[Request, dict]:
        seed = request_seed(rng)
        shots = pick_examples(self.examples, self.cfg.examples, rng)
        req = make_request(fmt, seed, edit_messages(c.source_caption, shots),
                           edit_prompt(c.source_caption, shots), EDIT_SCHEMA, [END], self.cfg.structured)
        return req, {"seed": seed, "examples": [self.examples.index(e) for e in shots]}

    def __call__(self, batch: list[Candidate]) -> None:
        fmt = self.gen.format
        info = {**self.gen.describe(), "format": fmt}
        rngs = {id(c): c.rng("edits") for c in batch}
        todo = list(batch)
        for attempt in range(self.cfg.attempts):
            # Attempt k of a candidate draws from its own rng stream: the result does not depend
            # on which other candidates needed another attempt.
            built = [self._request(c, rngs[id(c)], fmt) for c in todo]
            replies = self.gen.generate([r for r, _ in built])
            if len(replies) != len(todo):
                raise RuntimeError(f"{self.name}: {len(replies)} replies for {len(todo)} requests")
            retry = []
            for c, (_, meta), r in zip(todo, built, replies):
                c.generator["edits"] = {**info, **meta, "attempt": attempt + 1}
                reason = f"text_{r.error}" if r.error else None
                if r.error and r.detail:
                    c.generator["edits"]["error"] = r.detail
                if reason is None:
                    p = parse_edit(r.text, c.source_caption, fmt, self.limits, r.finish_reason)
                    if p.ok:
                        c.modification_text, c.target_caption, c.edit_type = p.instruction, p.edited_caption, "llm"
                        continue
                    reason = p.reason
                    c.generator["edits"]["raw"] = r.text[:RAW_KEEP]
                if attempt + 1 < self.cfg.attempts:
                    retry.append(c)
                else:
                    c.reject(reason)
            todo = retry
            if not todo:
                break
