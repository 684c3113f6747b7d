"""The `transformers` text backend on tiny local causal LMs (no hub): batching with left padding,
seeded sampling, chat/completion auto-detection, and the parser's rejects counted per reason."""
from __future__ import annotations

from collections import Counter

import pytest

from datagen.candidate import Candidate, candidate_seed
from datagen.edits import build_edits
from datagen.recipe import load_gen_recipe
from datagen.text.hf_backend import TransformersGenerator, load_model, resolve_model
from datagen.text.llm import Request
from datagen.text.prompt import SEP_PROMPT

torch = pytest.importorskip("torch")
from tinylm import SCRIPT, save_memorised_lm, save_random_lm  # noqa: E402


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    pairs = [(cap + SEP_PROMPT, out) for cap, out, _ in SCRIPT]
    return save_memorised_lm(tmp_path_factory.mktemp("mem"), pairs)


@pytest.fixture(scope="module")
def random_lm(tmp_path_factory):
    return save_random_lm(tmp_path_factory.mktemp("rand"))


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
    return save_random_lm(tmp_path_factory.mktemp("chat"), chat=True, seed=1)


def recipe(model, *extra):
    return load_gen_recipe("shapes-high", [
        "captions.source=file", "captions.path=unused.txt", "edits.backend=transformers",
        f"edits.llm.model={model}", "edits.llm.examples=0", "edits.llm.max_new_tokens=48",
        "edits.llm.runtime.device=cpu", *extra])


def candidates(captions, unit=0):
    out = []
    for j, cap in enumerate(captions):
        c = Candidate(unit, j, candidate_seed(0, unit, j))
        c.source_caption = cap
        out.append(c)
    return out


def test_memorised_model_end_to_end_accepts_good_and_counts_bad(memorised):
    ed = build_edits(recipe(memorised, "edits.llm.temperature=0", "edits.llm.runtime.batch_size=4"))
    assert ed.gen.format == "completion"            # no chat template -> IP2P few-shot format
    batch = candidates([cap for cap, _, _ in SCRIPT])
    ed(batch)
    for c, (_, _, want) in zip(batch, SCRIPT):
        if want.startswith("text_"):
            assert c.reject_reason == want, (c.reject_reason, c.generator["edits"].get("raw"))
            assert c.generator["edits"]["raw"]      # kept for debugging in the rejects shard
        else:
            assert c.kept and c.target_caption == want, c.generator["edits"].get("raw")
            assert c.modification_text and c.edit_type == "llm"
    assert Counter(c.reject_reason for c in batch) == Counter(
        {None: 3, "text_noop": 1, "text_malformed": 2})
    g = batch[0].generator["edits"]
    assert g["format"] == "completion" and g["temperature"] == 0.0 and isinstance(g["seed"], int)


def test_batches_are_left_padded_and_split_by_batch_size(random_lm, monkeypatch):
    gen = TransformersGenerator(recipe(random_lm, "edits.llm.runtime.batch_size=2",
                                       "edits.llm.max_new_tokens=5").edits.llm)
    tok, lm = gen._load()
    calls = []
    real = lm.generate

    def spy(**kw):
        calls.append((tuple(kw["input_ids"].shape), kw["attention_mask"].clone()))
        out = real(**kw)
        assert out.shape[0] == kw["input_ids"].shape[0] and out.shape[1] <= kw["input_ids"].shape[1] + 5
        return out

    monkeypatch.setattr(lm, "generate", spy)
    prompts = ["a dog" + SEP_PROMPT, "a very long caption of a red car parked on a busy street" + SEP_PROMPT,
               "x" + SEP_PROMPT, "two cats" + SEP_PROMPT, "a boat" + SEP_PROMPT]
    replies = gen.generate([Request(seed=i, prompt=p, stop=["\nEND"]) for i, p in enumerate(prompts)])
    assert len(replies) == 5 and [s[0][0] for s in calls] == [2, 2, 1]
    mask = calls[0][1]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()     # padding on the left
    assert all(r.finish_reason in ("stop", "length") and r.error is None for r in replies)


def test_same_seed_same_text_whatever_the_batch(random_lm):
    cfg = recipe(random_lm, "edits.llm.temperature=1.0", "edits.llm.max_new_tokens=12").edits.llm
    prompts = [f"caption {i} of a dog" + SEP_PROMPT for i in range(4)]
    reqs = [Request(seed=100 + i, prompt=p) for i, p in enumerate(prompts)]
    gen = TransformersGenerator(cfg)
    a = [r.text for r in gen.generate(reqs)]
    b = [r.text for r in gen.generate(reqs)]
    assert a == b
    cfg.runtime.batch_size = 1
    c = [r.text for r in TransformersGenerator(cfg).generate(reqs)]
    assert c == a                                    # each row has its own generator
    d = [r.text for r in gen.generate([Request(seed=7 + i, prompt=p) for i, p in enumerate(prompts)])]
    assert d != a
    e = [r.text for r in gen.generate(list(reversed(reqs)))]
    assert e == list(reversed(a))


def test_random_model_output_is_rejected_and_counted(random_lm):
    ed = build_edits(recipe(random_lm, "edits.llm.max_new_tokens=8", "edits.llm.runtime.batch_size=3"))
    batch = candidates([f"a photo of a dog number {i}" for i in range(7)])
    ed(batch)
    reasons = Counter(c.reject_reason for c in batch)
    assert sum(reasons.values()) == 7 and reasons[None] == 0
    assert set(reasons) <= {"text_malformed", "text_truncated", "text_empty"}
    again = candidates([f"a photo of a dog number {i}" for i in range(7)])
    ed(again)
    assert [c.generator["edits"]["raw"] for c in again] == [c.generator["edits"]["raw"] for c in batch]


def test_chat_template_is_detected_and_used(chat_lm, monkeypatch):
    ed = build_edits(recipe(chat_lm, "edits.llm.max_new_tokens=6", "edits.llm.examples=2"))
    assert ed.gen.format == "chat"
    tok, _ = ed.gen._load()
    seen = []
    real = tok.apply_chat_template

    def spy(messages, **kw):
        seen.append((messages, kw))
        return real(messages, **kw)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    batch = candidates(["a dog on a sofa", "a red car"])
    ed(batch)
    assert len(seen) == 2 and seen[0][1]["add_generation_prompt"] is True
    assert [m["role"] for m in seen[0][0]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert seen[0][0][-1]["content"] == "a dog on a sofa"
    assert all(c.reject_reason in ("text_malformed", "text_truncated") for c in batch)
    forced = build_edits(recipe(chat_lm, "edits.llm.format=completion", "edits.llm.max_new_tokens=4"))
    assert forced.gen.format == "completion"


def test_loading_is_safe_by_default_and_accepts_gguf_paths(random_lm, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model.cache_clear()
    load_model(str(random_lm), None, None, "auto", "cpu", False)
    assert seen["trust_remote_code"] is False and seen["dtype"] == torch.float32
    assert resolve_model("/models/x/model-q4.gguf", None) == ("/models/x", "model-q4.gguf")
    assert resolve_model("org/name", "f.gguf") == ("org/name", "f.gguf")
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_model("pypi:no-such-package-xyz", None)


def test_batch_sizes_are_in_the_recipe_hash_only_where_they_change_records():
    """Case 13's kind: a knob that changes records is in the identity, one that does not is not.
    In-process LLMs sample from logits that depend on the prompts batched together; diffusion
    calls are padded to pairs_per_call and CLIP scores fixed row blocks, so there the pipeline's
    and the filter's batch sizes change nothing and stay out of the hash."""
    from datagen.recipe import load_gen_recipe

    def h(*sets):
        return load_gen_recipe("shapes-high", list(sets)).hash()

    real = ["captions.source=file", "captions.path=caps.txt"]
    for backend in ("transformers", "vllm"):
        llm = real + [f"edits.backend={backend}", "edits.llm.model=m"]
        assert h(*llm, "pipeline.batch_size=4") != h(*llm, "pipeline.batch_size=1"), backend
    hf = real + ["edits.backend=transformers", "edits.llm.model=m"]
    assert h(*hf, "edits.llm.runtime.batch_size=2") != h(*hf, "edits.llm.runtime.batch_size=8")
    assert h(*hf, "edits.llm.runtime.device=cpu") == h(*hf, "edits.llm.runtime.device=cuda")
    topics = ["captions.source=llm", "captions.llm_backend=transformers", "captions.llm.model=m",
              "captions.topics=[cats]", "edits.backend=keywords"]
    assert h(*topics, "pipeline.batch_size=4") != h(*topics, "pipeline.batch_size=1")
    oa = real + ["edits.backend=openai", "edits.llm.model=m"]
    assert h(*oa, "pipeline.batch_size=4") == h(*oa, "pipeline.batch_size=1")
    assert h(*oa, "edits.llm.runtime.batch_size=2") == h(*oa, "edits.llm.runtime.batch_size=8")
    sd = real + ["edits.backend=keywords", "images.backend=diffusers-paired", "images.resolution=32"]
    assert h(*sd, "pipeline.batch_size=4") == h(*sd, "pipeline.batch_size=1")
    assert h(*sd, "images.diffusion.pairs_per_call=4") != h(*sd, "images.diffusion.pairs_per_call=1")
    assert h("pipeline.batch_size=7", "filters.clip.batch_size=5") == h()
