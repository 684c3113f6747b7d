"""Composed-query prompts: where the pseudo-word token goes is a position in the template.

A template such as `a photo of * that {}` has one placeholder word (`*`, the released TSCIR
code's) outside its `{}` field; filling the field with a relative caption gives a `QueryPrompt`
that keeps the two sides apart: `prefix` (before the placeholder) and `suffix` (after it, with the
caption). The tokenizer encodes prefix and suffix separately and puts the pseudo-word token(s)
between them, so a `*` or `$` inside a caption or modification text is tokenized as text and never
takes the image's pseudo-word (the released code finds the position by token id, and so did our
first design: a user's `$` would have received the pseudo-word too).

`$` is accepted as the placeholder of a template as well (SEARLE's and our earlier templates), so
`a photo of $ that {}` and `a photo of * that {}` give the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from datagen.base.errors import CirgenError

PLACEHOLDER = "*"
PLACEHOLDERS = ("*", "$")           # a template may use either (first one found is the position)


class PromptError(CirgenError, ValueError):
    """A template without exactly one placeholder before its `{}` field, or a prompt whose
    placeholder does not fit in the text context."""


@dataclass(frozen=True)
class QueryPrompt:
    """`prefix` + <pseudo-word token(s)> + `suffix`. Plain text on both sides."""

    prefix: str
    suffix: str

    def text(self, placeholder: str = PLACEHOLDER, n_tokens: int = 1) -> str:
        """The prompt as one string, for logs: `a photo of * that ...` (n_tokens placeholders)."""
        return f"{self.prefix}{' '.join([placeholder] * n_tokens)}{self.suffix}"


def split_template(template: str) -> tuple[str, str]:
    """`a photo of * that {}` -> (`a photo of `, ` that {}`). Errors: `PromptError` when the template
    has no placeholder, or more than one, before its `{}` field (the whole template when it has
    none; a placeholder after the field stays text)."""
    field = template.find("{}")
    head = template if field < 0 else template[:field]
    found = [(head.find(p), p) for p in PLACEHOLDERS if p in head]
    if not found:
        raise PromptError(f"template {template!r} has no placeholder ({' or '.join(PLACEHOLDERS)}) "
                          "before its {} field")
    pos, ph = min(found)
    if any(p in head[pos + 1:] for p in PLACEHOLDERS):
        raise PromptError(f"template {template!r} has more than one placeholder before its {{}} field")
    return template[:pos], template[pos + len(ph):]


def fill_template(template: str, text: str | None = None) -> QueryPrompt:
    """A QueryPrompt from a template and (optionally) the text for its `{}` field. The text is
    inserted verbatim (`{`, `}`, `*`, `$` in it stay text). Errors: `PromptError` from
    `split_template`, or when the template has a `{}` field and `text` is None."""
    prefix, suffix = split_template(template)
    if "{}" in suffix:
        if text is None:
            raise PromptError(f"template {template!r} needs a text for its {{}} field")
        i = suffix.index("{}")
        suffix = suffix[:i] + text + suffix[i + 2:]
    return QueryPrompt(prefix, suffix)


def as_query_prompts(prompts) -> list[QueryPrompt]:
    """Accept QueryPrompts, or template strings without a `{}` field (`a photo of *`).
    Errors: `PromptError` for a string that is not such a template."""
    return [p if isinstance(p, QueryPrompt) else fill_template(p) for p in prompts]
