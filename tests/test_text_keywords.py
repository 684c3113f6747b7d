"""The `keywords` text backend: vocabulary, templates, substitution, consistency, registry."""
from __future__ import annotations

import re

import numpy as np
import pytest

from datagen.candidate import Candidate, candidate_seed
from datagen.base.config import ConfigError
from datagen.edits import build_edits
from datagen.filters import normalise
from datagen.recipe import load_gen_recipe
from datagen.text.keywords import article, find_terms, load_vocabulary, plural, substitute

CAPTIONS = [
    "A dog running on the beach",
    "two men riding horses in a snowy field",
    "an apple on a wooden table",
    "A red car parked on a busy street at night",
    "the cat is sleeping on a sofa",
    "Teddy bears on a bed",
    "people walking in a park in autumn",
    "a photo of an old woman with an umbrella",
    "a glass vase with sunflowers on a windowsill",
    "a bowl of strawberries on a marble counter",
    "Children playing football in the city",
    "a boat on a lake under a cloudy sky",
]


def test_at_least_40_generic_templates_all_well_formed():
    v = load_vocabulary()
    assert len(v.generic) >= 40
    assert len(set(v.generic)) == len(v.generic)
    for t in v.generic + tuple(x for lst in v.by_category.values() for x in lst):
        assert "{target}" in t or "{a_target}" in t
        t.format(source="s", target="t", a_source="a s", a_target="a t")


def test_vocabulary_terms_have_one_meaning_and_real_replacements():
    v = load_vocabulary()
    assert len({t.term for t, _ in v.surfaces.values()}) >= 150
    for surface, (term, _) in v.surfaces.items():
        assert term.term not in term.replacements


def test_plural_and_article_rules():
    irr = load_vocabulary().plurals
    assert [plural(w, irr) for w in ("dog", "bus", "box", "cherry", "day", "man", "teddy bear", "wolf")] == \
        ["dogs", "buses", "boxes", "cherries", "days", "men", "teddy bears", "wolves"]
    assert [article(w) for w in ("apple", "car", "umbrella", "university", "hour")] == ["an", "a", "an", "a", "an"]


def test_matching_longest_first_plural_and_adjective_only_materials():
    v = load_vocabulary()
    found = [(m.term.term, m.is_plural) for m in find_terms("Teddy bears near a teddy bear", v)]
    assert found == [("teddy bear", True), ("teddy bear", False)]
    assert [m.term.term for m in find_terms("a stone wall", v)] == ["stone"]
    assert [m.term.term for m in find_terms("a stone in the river", v)] == ["river"]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_each_instruction_is_consistent_with_its_edited_caption(caption):
    v = load_vocabulary()
    for s in range(25):
        e = substitute(caption, v, np.random.default_rng([7, s]))
        assert e is not None
        # exactly one term changed: the source left the caption and the target came in
        assert e.source != e.target
        assert re.search(rf"\b{re.escape(e.source)}\b", caption.lower())
        assert re.search(rf"\b{re.escape(e.target)}\b", e.edited_caption.lower())
        assert not re.search(rf"\b{re.escape(e.target)}\b", caption.lower())
        assert e.target in e.instruction
        assert normalise(e.edited_caption) != normalise(caption)
        before, after = caption.lower().split(), e.edited_caption.lower().split()
        assert abs(len(after) - len(before)) <= 2          # a local edit, not a rewrite
        assert not re.search(r"\ba [aeiou]", e.edited_caption.lower().replace("a uni", "")), e.edited_caption
        assert "{" not in e.instruction


def test_substitution_keeps_case_fixes_articles_and_inflects():
    v = load_vocabulary()
    outs = {substitute("An apple on a plate", v, np.random.default_rng(s)).edited_caption for s in range(40)}
    assert any(o.startswith("A ") and "apple" not in o for o in outs)    # "An apple" -> "A pear"
    outs = {substitute("Dogs in the snow", v, np.random.default_rng(s)).edited_caption for s in range(40)}
    assert "Cats in the snow" in outs or "Foxes in the snow" in outs or "Wolves in the snow" in outs


def test_editor_component_rejects_captions_without_a_keyword(tmp_path):
    r = load_gen_recipe("shapes-high", ["edits.backend=keywords"])
    ed = build_edits(r)
    batch = [Candidate(0, j, candidate_seed(0, 0, j)) for j in range(3)]
    batch[0].source_caption = "a dog on the beach"
    batch[1].source_caption = "zzz qqq"
    batch[2].source_caption = "a dog on the beach"
    ed(batch)
    assert batch[0].kept and batch[0].edit_type.startswith("keyword_") and batch[0].modification_text
    assert batch[1].reject_reason == "text_no_keyword"
    assert batch[2].target_caption and batch[2].generator["edits"]["source"]
    again = [Candidate(0, 0, candidate_seed(0, 0, 0))]
    again[0].source_caption = "a dog on the beach"
    ed(again)
    assert (again[0].modification_text, again[0].target_caption) == \
        (batch[0].modification_text, batch[0].target_caption)


def test_rules_backend_refuses_real_captions():
    r = load_gen_recipe("shapes-high", ["captions.source=file", "captions.path=x.txt"])
    with pytest.raises(ConfigError, match="keywords"):
        build_edits(r)


def test_custom_vocabulary_is_validated(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("categories:\n  a: {nouns: true, terms: {dog: [cat]}}\n  b: {nouns: false, terms: {dog: [red]}}\n"
                 "templates: {generic: ['change {source} to {target}']}\n")
    with pytest.raises(ValueError, match="both"):
        load_vocabulary(str(f))
    f.write_text("categories:\n  a: {terms: {dog: [cat]}}\ntemplates: {generic: ['remove {source}']}\n")
    with pytest.raises(ValueError, match="target"):
        load_vocabulary(str(f))


def test_custom_vocabulary_errors_name_the_problem(tmp_path):
    f = tmp_path / "v.yaml"
    tpl = "templates: {generic: ['change {source} to {target}']}\n"
    f.write_text("categories:\n  a: {terms: {a big red dog: [cat]}}\n" + tpl)
    with pytest.raises(ValueError, match=r"v.yaml: a.a big red dog: a term has at most 3 words"):
        load_vocabulary(str(f))
    f.write_text("categories:\n  a: {terms: {dog: [dog]}}\n" + tpl)
    with pytest.raises(ValueError, match=r"v.yaml: a.dog: needs replacements other than itself"):
        load_vocabulary(str(f))
