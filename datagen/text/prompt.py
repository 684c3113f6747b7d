"""The one prompt format and the one parser of the LLM text backends.

Two wire formats, one per kind of model:

* `chat` (instruction/chat models): a system message, few-shot turns, and a reply that is the JSON
  object {"instruction": ..., "edited_caption": ...} (JSON-schema constrained where the backend can).
* `completion` (base models): InstructPix2Pix's fine-tuning format, used few-shot:
  `caption\\n##\\n` -> `instruction\\n%%\\nedited caption\\nEND`.

`parse_edit` turns any backend's reply into (instruction, edited caption) or a reject reason
(`text_malformed`, `text_empty`, `text_too_long`, `text_noop`, `text_truncated`,
`text_reasoning_unclosed`, `text_ambiguous`); the caller counts it with `Candidate.reject`.
Reasoning blocks (`<think>...</think>`) are never read as the answer: a draft object inside one is
not the edit. In the final answer, the one object with the expected keys is the answer; two
different such objects are `ambiguous` (rejected, not guessed). Model output is only ever parsed
as data (json decoding), never run.
The caption task (captions.source: llm) follows the same pattern with `caption_*` reasons.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from ..base.assets import asset_path
from ..base.config import ConfigError
from ..filters import normalise

SEP_PROMPT = "\n##\n"      # ends the caption (IP2P)
SEP_EDIT = "\n%%\n"        # between instruction and edited caption
END = "\nEND"              # ends the completion; also the stop sequence
FORMATS = ("chat", "completion")

EDIT_SCHEMA: dict = {
    "type": "object",
    "properties": {"instruction": {"type": "string", "minLength": 1},
                   "edited_caption": {"type": "string", "minLength": 1}},
    "required": ["instruction", "edited_caption"],
    "additionalProperties": False,
}
CAPTION_SCHEMA: dict = {
    "type": "object",
    "properties": {"caption": {"type": "string", "minLength": 1}},
    "required": ["caption"],
    "additionalProperties": False,
}

EDIT_SYSTEM = (
    "You write image-editing instructions. Given the caption of an image, reply with a JSON object "
    '{"instruction": ..., "edited_caption": ...}. The instruction is one short edit a person could '
    "make to that image (change, add or remove one thing; or change the style, weather, time or "
    "place). The edited caption describes the edited image and keeps every word of the input "
    "caption that the edit does not change. Reply with the JSON object only."
)
CAPTION_SYSTEM = (
    "You write captions of photographs. Given a topic, reply with a JSON object {\"caption\": ...} "
    "holding one short, concrete caption of a photo about that topic: what a camera would see "
    "(objects, colours, setting), no opinions. Reply with the JSON object only."
)


@dataclass(frozen=True)
class EditExample:
    """A few-shot example of the edit task."""

    caption: str
    instruction: str
    edited_caption: str


@dataclass(frozen=True)
class CaptionExample:
    """A few-shot example of the caption task."""

    topic: str
    caption: str


@dataclass(frozen=True)
class Limits:
    """Word limits of a parsed edit (`parse_edit`); longer is `text_too_long`."""

    max_instruction_words: int = 40
    max_caption_words: int = 77


@dataclass
class Parsed:
    """A parsed reply: the fields, or the reject reason."""
    instruction: str = ""
    edited_caption: str = ""
    caption: str = ""
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when the reply was accepted (no reject reason)."""
        return self.reason is None


def _load_yaml_list(path: str, default: tuple[str, ...]) -> tuple[Path, list]:
    file = Path(path) if path else asset_path(*default)
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{file}: cannot read examples ({e})") from None
    items = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{file}: expected a mapping with a non-empty list `examples`")
    return file, items


@lru_cache(maxsize=None)
def load_edit_examples(path: str = "") -> tuple[EditExample, ...]:
    """Few-shot examples; each must itself pass the parser (a bad example teaches bad output).
    `path` "" = shipped. Raises ConfigError naming the file for an unreadable file, no `examples` list,
    an example without caption/instruction/edited_caption, or one the parser rejects."""
    file, items = _load_yaml_list(path, ("prompts", "edit_examples.yaml"))
    out = []
    for i, it in enumerate(items):
        try:
            ex = EditExample(str(it["caption"]).strip(), str(it["instruction"]).strip(),
                             str(it["edited_caption"]).strip())
        except (KeyError, TypeError):
            raise ConfigError(f"{file}: examples[{i}] needs caption, instruction and edited_caption") from None
        p = parse_edit(edit_reply_json(ex), ex.caption, "chat")
        q = parse_edit(edit_completion(ex), ex.caption, "completion")
        if not (p.ok and q.ok):
            raise ConfigError(f"{file}: examples[{i}] is rejected by the parser ({p.reason or q.reason})")
        out.append(ex)
    return tuple(out)


@lru_cache(maxsize=None)
def load_caption_examples(path: str = "") -> tuple[CaptionExample, ...]:
    """Few-shot examples of the caption task (`path` "" = shipped). Raises ConfigError naming the file
    for an unreadable file, no `examples` list, or an example without topic and caption."""
    file, items = _load_yaml_list(path, ("prompts", "caption_examples.yaml"))
    try:
        return tuple(CaptionExample(str(it["topic"]).strip(), str(it["caption"]).strip()) for it in items)
    except (KeyError, TypeError):
        raise ConfigError(f"{file}: every example needs topic and caption") from None


def pick_examples(examples: tuple, k: int, rng: np.random.Generator) -> list:
    """k examples in a per-candidate random order (varied prompts give varied edits)."""
    k = min(k, len(examples))
    return [examples[int(i)] for i in rng.permutation(len(examples))[:k]]


# ---- edit task: prompts -------------------------------------------------------------------------

def edit_reply_json(ex: EditExample) -> str:
    """The chat-format reply of an example: {"instruction": ..., "edited_caption": ...} as JSON."""
    return json.dumps({"instruction": ex.instruction, "edited_caption": ex.edited_caption})


def edit_completion(ex: EditExample) -> str:
    """What a base model should write after `caption + SEP_PROMPT`."""
    return f"{ex.instruction}{SEP_EDIT}{ex.edited_caption}{END}"


def edit_messages(caption: str, examples: list[EditExample]) -> list[dict]:
    """Chat messages of the edit task: the system message, a user/assistant turn per example, the caption."""
    msgs = [{"role": "system", "content": EDIT_SYSTEM}]
    for ex in examples:
        msgs += [{"role": "user", "content": ex.caption},
                 {"role": "assistant", "content": edit_reply_json(ex)}]
    msgs.append({"role": "user", "content": caption.strip()})
    return msgs


def edit_prompt(caption: str, examples: list[EditExample]) -> str:
    """Completion prompt of the edit task in IP2P's format: the examples, then `caption + SEP_PROMPT`."""
    shots = "".join(f"{ex.caption}{SEP_PROMPT}{edit_completion(ex)}\n\n" for ex in examples)
    return f"{shots}{caption.strip()}{SEP_PROMPT}"


# ---- caption task: prompts ----------------------------------------------------------------------

def caption_messages(topic: str, examples: list[CaptionExample]) -> list[dict]:
    """Chat messages of the caption task: the system message, a turn per example, "Topic: <topic>"."""
    msgs = [{"role": "system", "content": CAPTION_SYSTEM}]
    for ex in examples:
        msgs += [{"role": "user", "content": f"Topic: {ex.topic}"},
                 {"role": "assistant", "content": json.dumps({"caption": ex.caption})}]
    msgs.append({"role": "user", "content": f"Topic: {topic.strip()}"})
    return msgs


def caption_prompt(topic: str, examples: list[CaptionExample]) -> str:
    """Completion prompt of the caption task: "Topic: ...\nCaption: ..." examples, ending in "Caption:"."""
    shots = "".join(f"Topic: {ex.topic}\nCaption: {ex.caption}\n\n" for ex in examples)
    return f"{shots}Topic: {topic.strip()}\nCaption:"


# ---- the parser ---------------------------------------------------------------------------------

_MARKERS = ("##", "%%")   # format markers that must not leak into a field
# Reasoning models (DeepSeek-R1, Qwen3, ...) think before answering. Chat templates that open the
# block in the prompt leave only the closing tag in the reply, so a lone closer counts too.
_THINK_TAGS = ("think", "thinking", "reasoning")
_THINK_OPEN = re.compile(r"<(%s)>" % "|".join(_THINK_TAGS), re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(%s)>" % "|".join(_THINK_TAGS), re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """`text` without its reasoning blocks (`<think>...</think>`, also `<thinking>`,
    `<reasoning>`), i.e. the model's final answer; None when a block is never closed (the answer
    cannot be told from the reasoning). Everything before a closing tag is reasoning, including
    a reply that starts inside a block its chat template opened."""
    close = None
    for close in _THINK_CLOSE.finditer(text):
        pass
    rest = text if close is None else text[close.end():]
    if _THINK_OPEN.search(rest):
        return None
    return rest


def _json_objects(text: str) -> list[dict]:
    """Every complete top-level JSON object in `text`, left to right (prose, code fences and a
    stray `{` around them tolerated; nothing is ever evaluated, only `json` decoding)."""
    dec = json.JSONDecoder()
    out, i = [], text.find("{")
    while i >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            out.append(obj)
        i = text.find("{", end)
    return out


def _answer_object(text: str, keys: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """(the reply's answer object, None) or (None, why): "reasoning_unclosed" for a think block
    never closed, "ambiguous" when the final answer holds two different objects with all of
    `keys` (which one the model meant is a guess), "no_object" when it holds no JSON object. A
    single answer-shaped object wins over other JSON around it; repeats of one object are one."""
    answer = final_answer(text)
    if answer is None:
        return None, "reasoning_unclosed"
    objs = _json_objects(answer)
    if not objs:
        return None, "no_object"
    shaped = [o for o in objs if all(k in o for k in keys)]
    if len({json.dumps(o, sort_keys=True) for o in shaped}) > 1:
        return None, "ambiguous"
    return (shaped or objs)[-1], None


def _words(text: str) -> int:
    return len(text.split())


def _one_line(text: str) -> str | None:
    t = text.strip()
    return None if "\n" in t else " ".join(t.split())


def parse_edit(text: str, source_caption: str, fmt: str, limits: Limits = Limits(),
               finish_reason: str = "stop") -> Parsed:
    """Parse a reply in format `fmt` (chat: JSON; completion: IP2P) for `source_caption`.

    Returns the whitespace-collapsed fields, or a `text_*` reject reason (module docstring); word limits
    from `limits`. Raises ValueError for a format not in `FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}")
    text = text or ""
    if finish_reason == "length" and final_answer(text) is None:
        return Parsed(reason="text_truncated")          # ran out of tokens while reasoning
    if fmt == "chat":
        obj, why = _answer_object(text, ("instruction", "edited_caption"))
        if why == "no_object":
            return Parsed(reason="text_truncated" if finish_reason == "length" else "text_malformed")
        if obj is None:
            return Parsed(reason=f"text_{why}")
        ins, out = obj.get("instruction"), obj.get("edited_caption")
        if not isinstance(ins, str) or not isinstance(out, str):
            return Parsed(reason="text_malformed")
        ins, out = " ".join(ins.split()), " ".join(out.split())
    else:
        answer = final_answer(text)
        if answer is None:
            return Parsed(reason="text_reasoning_unclosed")
        text = answer
        cut = text.find(END)
        if cut >= 0:
            text = text[:cut]
        elif finish_reason == "length":
            return Parsed(reason="text_truncated")
        parts = text.split(SEP_EDIT)
        if len(parts) != 2:
            return Parsed(reason="text_malformed")
        ins, out = _one_line(parts[0]), _one_line(parts[1])
        if ins is None or out is None:
            return Parsed(reason="text_malformed")
    if any(m in ins or m in out for m in _MARKERS):
        return Parsed(reason="text_malformed")      # leaked format markers
    if not normalise(ins) or not normalise(out):
        return Parsed(reason="text_empty")
    if _words(ins) > limits.max_instruction_words or _words(out) > limits.max_caption_words:
        return Parsed(reason="text_too_long")
    if normalise(out) == normalise(source_caption):
        return Parsed(reason="text_noop")
    return Parsed(instruction=ins, edited_caption=out)


def parse_caption(text: str, fmt: str, max_words: int = 77, finish_reason: str = "stop") -> Parsed:
    """Parse an LLM-written caption (chat: {"caption": ...}; completion: the rest of the line).

    Returns the caption or a `caption_*` reject reason (`caption_too_long` over `max_words` words).
    Raises ValueError for a format not in `FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}")
    text = text or ""
    if finish_reason == "length" and final_answer(text) is None:
        return Parsed(reason="caption_truncated")
    if fmt == "chat":
        obj, why = _answer_object(text, ("caption",))
        if why == "no_object":
            return Parsed(reason="caption_truncated" if finish_reason == "length" else "caption_malformed")
        if obj is None:
            return Parsed(reason=f"caption_{why}")
        cap = obj.get("caption")
        if not isinstance(cap, str):
            return Parsed(reason="caption_malformed")
        cap = " ".join(cap.split())
    else:
        answer = final_answer(text)
        if answer is None:
            return Parsed(reason="caption_reasoning_unclosed")
        # After a reasoning block the answer starts on a later line.
        text = answer if len(answer) == len(text) else answer.lstrip()
        nl = text.find("\n")
        if nl >= 0:
            text = text[:nl]
        elif finish_reason == "length":
            return Parsed(reason="caption_truncated")
        cap = " ".join(text.split())
        if cap.lower().startswith(("topic:", "caption:")):
            return Parsed(reason="caption_malformed")
    if not normalise(cap):
        return Parsed(reason="caption_empty")
    if _words(cap) > max_words:
        return Parsed(reason="caption_too_long")
    return Parsed(caption=cap)
