"""`keywords` text backend: keyword substitution in real captions (CompoDiff's keyword branch).

Find a substitutable term of the vocabulary (assets/prompts/keywords.yaml) in the caption, replace
it by a related-but-different term, and phrase the instruction from a template ("change {source}
to {target}", "{target} is added after {source} is removed", ...). No model; deterministic per
candidate. Nouns are matched in the plural too and the replacement is inflected; a preceding
"a"/"an" is fixed; the capitalisation of the matched word is kept. A caption with no known term
is a counted reject (`text_no_keyword`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from ..base.assets import asset_path
from ..base.config import ConfigError
from ..candidate import Candidate

_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
_MAX_TERM_WORDS = 3
_FUNCTION_WORDS = frozenset("a an the of in on at to and or with by for from is are was were".split())
_SLOTS = ("{source}", "{target}", "{a_source}", "{a_target}")
_VOWEL_SOUND_EXCEPTIONS = {"uni": "a", "use": "a", "one": "a", "eu": "a", "hour": "an", "honest": "an"}


def plural(word: str, irregular: dict[str, str]) -> str:
    """English plural of `word` (of its last word for a multi-word term); `irregular` overrides
    ("mouse" -> "mice"), else -es after s/x/z/ch/sh, -ies after consonant + y, else -s."""
    if word in irregular:
        return irregular[word]
    head, _, last = word.rpartition(" ")
    if head:                                    # "teddy bear" -> "teddy bears"
        return f"{head} {plural(last, irregular)}"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def article(word: str) -> str:
    """"a" or "an" for `word`: by its first letter, with a few vowel-sound exceptions ("a unicorn", "an hour")."""
    w = word.lower()
    for prefix, art in _VOWEL_SOUND_EXCEPTIONS.items():
        if w.startswith(prefix):
            return art
    return "an" if w[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class Term:
    """One vocabulary term: its category, replacements, whether it is a noun (plural forms, articles)
    and whether it only counts before another content word (`before_word`: a material in "stone wall")."""

    category: str
    term: str                     # singular dictionary form
    replacements: tuple[str, ...]
    noun: bool
    before_word: bool


@dataclass(frozen=True)
class Vocabulary:
    """The checked keyword vocabulary (`load_vocabulary`): surface forms, irregular plurals, templates."""

    surfaces: dict                # "dogs" -> (Term, is_plural)
    plurals: dict
    generic: tuple[str, ...]
    by_category: dict             # category -> its own templates

    def inflect(self, word: str, is_plural: bool) -> str:
        """`word` in the plural when `is_plural` (with the vocabulary's irregular plurals), else unchanged."""
        return plural(word, self.plurals) if is_plural else word


@lru_cache(maxsize=None)
def load_vocabulary(path: str = "") -> Vocabulary:
    """The keyword vocabulary YAML at `path` ("" = shipped); ConfigError naming the file if it is
    unreadable or not a vocabulary, and naming the entry for a term without replacements other than
    itself or longer than 3 words, a surface form in two categories, or a template that does not name
    the target or has an unknown slot."""
    file = Path(path) if path else asset_path("prompts", "keywords.yaml")
    try:
        data = yaml.safe_load(file.read_text())
        cats, plurals, tpl = data["categories"], dict(data.get("plurals") or {}), data["templates"]
        generic = tuple(tpl["generic"])
        return _vocabulary(file, cats, plurals, tpl, generic)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{file}: not a keyword vocabulary ({type(e).__name__}: {e})") from None


def _vocabulary(file: Path, cats: dict, plurals: dict, tpl: dict, generic: tuple) -> Vocabulary:
    """The checked vocabulary; a wrong shape (KeyError, TypeError, AttributeError) is reported by
    the caller, a wrong value here as ConfigError naming the file and the entry."""
    surfaces: dict = {}
    for cat, spec in cats.items():
        for term, repl in spec["terms"].items():
            term = str(term).lower()
            t = Term(cat, term, tuple(str(r).lower() for r in repl), bool(spec.get("nouns")),
                     bool(spec.get("before_word")))
            if len(term.split()) > _MAX_TERM_WORDS:
                raise ConfigError(f"{file}: {cat}.{term}: a term has at most {_MAX_TERM_WORDS} words")
            if not t.replacements or term in t.replacements:
                raise ConfigError(f"{file}: {cat}.{term}: needs replacements other than itself")
            forms = [(term, False)] + ([(plural(term, plurals), True)] if t.noun else [])
            for surface, is_pl in forms:
                if surface in surfaces and surfaces[surface][0].category != cat:
                    raise ConfigError(f"{file}: {surface!r} is in both {surfaces[surface][0].category} "
                                      f"and {cat}; a term must have one meaning")
                surfaces.setdefault(surface, (t, is_pl))
    by_cat = {k: tuple(v) for k, v in tpl.items() if k != "generic"}
    for name, lst in [("generic", generic), *by_cat.items()]:
        for s in lst:
            if "{target}" not in s and "{a_target}" not in s:
                raise ConfigError(f"{file}: template {s!r} ({name}) does not name the target")
            if re.sub(r"\{(source|target|a_source|a_target)\}", "", s).count("{"):
                raise ConfigError(f"{file}: template {s!r} ({name}) has an unknown slot")
    return Vocabulary(surfaces, plurals, generic, by_cat)


@dataclass
class Match:
    """A vocabulary term found in a caption (`find_terms`)."""

    start: int                    # character span in the caption
    end: int
    term: Term
    is_plural: bool


def find_terms(caption: str, vocab: Vocabulary) -> list[Match]:
    """All non-overlapping vocabulary terms in the caption, left to right, the longest (up to 3 words)
    at each position; a `before_word` term counts only when a non-function word follows it."""
    words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(caption)]
    found, i = [], 0
    while i < len(words):
        for n in range(min(_MAX_TERM_WORDS, len(words) - i), 0, -1):
            key = " ".join(w[2] for w in words[i:i + n])
            hit = vocab.surfaces.get(key)
            if hit is None:
                continue
            term, is_pl = hit
            nxt = words[i + n][2] if i + n < len(words) else None
            if term.before_word and (nxt is None or nxt in _FUNCTION_WORDS):
                continue
            found.append(Match(words[i][0], words[i + n - 1][1], term, is_pl))
            i += n - 1
            break
        i += 1
    return found


@dataclass
class KeywordEdit:
    """One keyword substitution: the instruction, the edited caption, and what was replaced by what."""

    instruction: str
    edited_caption: str
    category: str
    source: str
    target: str


def _case_like(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _with_article(word: str, term: Term, is_plural: bool) -> str:
    return f"{article(word)} {word}" if term.noun and not is_plural else word


def substitute(caption: str, vocab: Vocabulary, rng: np.random.Generator) -> KeywordEdit | None:
    """One keyword edit of `caption`, or None when it holds no substitutable term (or every replacement
    of the drawn term is already in the caption). The term, replacement and template come from `rng`."""
    lower = caption.lower()
    matches = find_terms(caption, vocab)
    if not matches:
        return None
    m = matches[int(rng.integers(len(matches)))]
    old = caption[m.start:m.end]
    # A replacement already in the caption would make the edit ambiguous ("a cat and a cat").
    options = [r for r in m.term.replacements
               if not re.search(rf"\b{re.escape(vocab.inflect(r, m.is_plural))}\b", lower)]
    if not options:
        return None
    target_base = options[int(rng.integers(len(options)))]
    target = vocab.inflect(target_base, m.is_plural)
    source = old.lower()
    before, after = caption[:m.start], caption[m.end:]
    art = re.search(r"\b(a|an|A|An|AN)(\s+)$", before)
    if art and not m.is_plural:                  # "an apple" -> "a pear"
        new_art = article(target)
        new_art = new_art.capitalize() if art.group(1)[0].isupper() else new_art
        before = before[:art.start(1)] + new_art + art.group(2)
    edited = before + _case_like(target, old) + after
    own = vocab.by_category.get(m.term.category, ())
    pool = own if own and rng.random() < 0.5 else vocab.generic
    template = pool[int(rng.integers(len(pool)))]
    instruction = template.format(source=source, target=target,
                                  a_source=_with_article(source, m.term, m.is_plural),
                                  a_target=_with_article(target, m.term, m.is_plural))
    return KeywordEdit(instruction, edited, m.term.category, source, target)


class KeywordEditor:
    """Edits stage for real captions: keyword substitution with instruction templates."""

    name = "keywords"

    def __init__(self, recipe):
        self.vocab = load_vocabulary(recipe.edits.vocabulary)

    def __call__(self, batch: list[Candidate]) -> None:
        for c in batch:
            e = substitute(c.source_caption, self.vocab, c.rng("edits"))
            if e is None:
                c.reject("text_no_keyword")
                continue
            c.modification_text, c.target_caption = e.instruction, e.edited_caption
            c.edit_type = f"keyword_{e.category}"
            c.generator["edits"] = {"source": e.source, "target": e.target, "category": e.category}
