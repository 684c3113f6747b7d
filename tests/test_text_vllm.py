"""The `vllm` text backend against a fake `vllm` module (vllm cannot run here): the exact
parameters it passes, for the current API (StructuredOutputsParams / structured_outputs=, vllm
>= 0.11) and the old one (GuidedDecodingParams / guided_decoding=, vllm <= 0.10)."""
from __future__ import annotations

import json
import sys
import types
from collections import Counter

import pytest

from datagen.candidate import Candidate, candidate_seed
from datagen.edits import build_edits
from datagen.recipe import load_gen_recipe
from datagen.text.llm import Request
from datagen.text.prompt import EDIT_SCHEMA


class Params:
    def __init__(self, **kw):
        self.kw = kw


def fake_vllm(api: str, replies=None, chat_template="{{ messages }}"):
    """A `vllm` module recording every call; `api` is "new", "old", "both" or "none"."""
    rec = {"init": None, "chat": [], "generate": [], "params": []}

    class SamplingParams(Params):
        def __init__(self, **kw):
            super().__init__(**kw)
            rec["params"].append(kw)

    class StructuredOutputsParams(Params):
        pass

    class GuidedDecodingParams(Params):
        pass

    def out(text, finish="stop"):
        return types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text, finish_reason=finish)])

    class LLM:
        def __init__(self, **kw):
            rec["init"] = kw

        def get_tokenizer(self):
            return types.SimpleNamespace(chat_template=chat_template)

        def _reply(self, n, sampling_params):
            assert isinstance(sampling_params, list) and len(sampling_params) == n
            script = list(replies or [])
            res = []
            for i in range(n):
                text, fin = script[i] if i < len(script) else (
                    json.dumps({"instruction": f"make it blue {i}", "edited_caption": f"a blue thing {i}"}), "stop")
                res.append(out(text, fin))
            return res

        def chat(self, messages, sampling_params=None, use_tqdm=True, **kw):
            rec["chat"].append({"messages": messages, "use_tqdm": use_tqdm, **kw})
            return self._reply(len(messages), sampling_params)

        def generate(self, prompts, sampling_params=None, use_tqdm=True, **kw):
            rec["generate"].append({"prompts": prompts, "use_tqdm": use_tqdm, **kw})
            return self._reply(len(prompts), sampling_params)

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    sp = types.ModuleType("vllm.sampling_params")
    sp.SamplingParams = SamplingParams
    if api in ("new", "both"):
        sp.StructuredOutputsParams = StructuredOutputsParams
    if api in ("old", "both"):
        sp.GuidedDecodingParams = GuidedDecodingParams
    mod.sampling_params = sp
    return mod, sp, rec


@pytest.fixture
def install(monkeypatch):
    def go(api, **kw):
        mod, sp, rec = fake_vllm(api, **kw)
        monkeypatch.setitem(sys.modules, "vllm", mod)
        monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)
        return rec
    return go


def recipe(*extra):
    return load_gen_recipe("shapes-high", [
        "captions.source=file", "captions.path=unused.txt", "edits.backend=vllm",
        "edits.llm.model=/models/Qwen2.5-7B-Instruct", "edits.llm.temperature=0.9", "edits.llm.top_p=0.95",
        "edits.llm.max_new_tokens=200", "edits.llm.examples=3", "edits.llm.tensor_parallel_size=2",
        "edits.llm.max_model_len=2048", *extra])


def candidates(n):
    out = []
    for j in range(n):
        c = Candidate(0, j, candidate_seed(0, 0, j))
        c.source_caption = f"a red car number {j}"
        out.append(c)
    return out


@pytest.mark.parametrize("api,field,cls", [("new", "structured_outputs", "StructuredOutputsParams"),
                                            ("both", "structured_outputs", "StructuredOutputsParams"),
                                            ("old", "guided_decoding", "GuidedDecodingParams")])
def test_chat_with_json_schema_for_each_api_generation(install, api, field, cls):
    rec = install(api)
    ed = build_edits(recipe("edits.llm.chat_template_kwargs={enable_thinking: false}"))
    assert "vllm" in sys.modules and rec["init"] is None        # the engine starts lazily
    batch = candidates(3)
    ed(batch)
    assert rec["init"] == {"model": "/models/Qwen2.5-7B-Instruct", "dtype": "auto", "seed": 0,
                           "tensor_parallel_size": 2, "max_model_len": 2048, "gpu_memory_utilization": 0.9,
                           "trust_remote_code": False}
    assert len(rec["chat"]) == 1 and not rec["generate"]          # one batched call
    call = rec["chat"][0]
    assert len(call["messages"]) == 3 and call["use_tqdm"] is False
    assert call["chat_template_kwargs"] == {"enable_thinking": False}
    assert call["messages"][1][-1] == {"role": "user", "content": "a red car number 1"}
    assert [m["role"] for m in call["messages"][0]][:2] == ["system", "user"]
    seeds = [p["seed"] for p in rec["params"]]
    assert len(set(seeds)) == 3 and seeds == [c.generator["edits"]["seed"] for c in batch]
    for p in rec["params"]:
        assert {k: p[k] for k in ("n", "temperature", "top_p", "max_tokens")} == \
            {"n": 1, "temperature": 0.9, "top_p": 0.95, "max_tokens": 200}
        other = "guided_decoding" if field == "structured_outputs" else "structured_outputs"
        assert other not in p and "stop" not in p
        assert type(p[field]).__name__ == cls and p[field].kw == {"json": EDIT_SCHEMA}
    assert all(c.kept for c in batch)
    assert batch[2].modification_text == "make it blue 2" and batch[2].target_caption == "a blue thing 2"


def test_missing_structured_api_refuses_instead_of_dropping_the_constraint(install):
    install("none")
    ed = build_edits(recipe())
    with pytest.raises(RuntimeError, match="neither StructuredOutputsParams nor GuidedDecodingParams"):
        ed(candidates(1))
    install("none")
    ed = build_edits(recipe("edits.llm.structured=false"))
    ed(candidates(1))                                   # explicitly unconstrained is allowed


def test_truncated_and_malformed_outputs_are_counted(install):
    ok = json.dumps({"instruction": "add a tree", "edited_caption": "a red car and a tree"})
    rec = install("new", replies=[('{"instruction": "add a tr', "length"), ("no json here", "stop"), (ok, "stop"),
                                  (json.dumps({"instruction": "x", "edited_caption": "a red car number 3"}), "stop")])
    ed = build_edits(recipe())
    batch = candidates(4)
    ed(batch)
    assert [c.reject_reason for c in batch] == ["text_truncated", "text_malformed", None, "text_noop"]
    assert len(rec["chat"]) == 1


def test_base_models_get_the_completion_format(install):
    rec = install("new", chat_template=None,
                  replies=[("make it green\n%%\na green car number 0", "stop")])
    ed = build_edits(recipe())
    assert ed.gen.format == "completion"
    batch = candidates(2)
    ed(batch)
    assert not rec["chat"] and len(rec["generate"]) == 1
    assert rec["generate"][0]["prompts"][0].endswith("a red car number 0\n##\n")
    p = rec["params"][0]
    assert p["stop"] == ["\nEND"] and p["max_tokens"] == 200
    assert "structured_outputs" not in p and "guided_decoding" not in p
    assert batch[0].kept and batch[0].target_caption == "a green car number 0"
    assert Counter(c.reject_reason for c in batch)["text_malformed"] == 1   # the default JSON reply


def test_vllm_is_not_imported_by_the_package():
    import subprocess

    code = ("import sys, datagen.text.llm, datagen.text.vllm_backend, datagen.edits, datagen.captions, "
            "datagen.text.sources; print('vllm' in sys.modules, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_real_high_recipe_builds_its_text_stage_without_starting_the_engine(install):
    rec = install("new")
    r = load_gen_recipe("real-high")
    assert (r.edits.backend, r.edits.llm.format, r.edits.llm.structured) == ("vllm", "chat", True)
    assert r.edits.llm.max_new_tokens >= 128 and r.edits.llm.trust_remote_code is False
    ed = build_edits(r)
    assert rec["init"] is None                           # nothing loads until the first batch
    p = ed.gen.sampling_params(Request(seed=3, messages=[], schema=EDIT_SCHEMA))
    assert p.kw["max_tokens"] == r.edits.llm.max_new_tokens and p.kw["seed"] == 3
    assert type(p.kw["structured_outputs"]).__name__ == "StructuredOutputsParams"


def test_real_low_recipe_builds_its_text_stage_without_loading_the_model():
    from datagen.text.hf_backend import load_model

    load_model.cache_clear()
    r = load_gen_recipe("real-low")
    assert (r.edits.backend, r.edits.llm.format, r.captions.source) == ("transformers", "completion", "file")
    ed = build_edits(r)
    assert ed.gen.format == "completion" and ed.gen._lm is None and load_model.cache_info().currsize == 0
