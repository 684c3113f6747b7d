"""The one prompt format and the one parser of the LLM text backends (datagen.text.prompt)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from datagen.text.prompt import (CAPTION_SCHEMA, EDIT_SCHEMA, END, SEP_EDIT, SEP_PROMPT, Limits,
                                 caption_messages, caption_prompt, edit_completion, edit_messages,
                                 edit_prompt, load_caption_examples, load_edit_examples, parse_caption,
                                 parse_edit, pick_examples)

SRC = "a red car parked on a street"


def J(**kw) -> str:
    return json.dumps(kw)


GOOD_CHAT = [
    (J(instruction="make the car blue", edited_caption="a blue car parked on a street"),
     ("make the car blue", "a blue car parked on a street")),
    # fenced, surrounded by prose, extra whitespace, extra keys: still the same object
    ("```json\n" + J(instruction="add a dog", edited_caption="a red car and a dog on a street") + "\n```",
     ("add a dog", "a red car and a dog on a street")),
    ("Sure! Here it is: " + J(instruction="make it  night", edited_caption="a red car parked on a street at night")
     + " Hope this helps.", ("make it night", "a red car parked on a street at night")),
    ('{"instruction": "remove the car", "edited_caption": "an empty street", "note": 1}',
     ("remove the car", "an empty street")),
    ('{"edited_caption": "a red bus parked on a street", "instruction": "turn the car into a bus"}',
     ("turn the car into a bus", "a red bus parked on a street")),
]

BAD_CHAT = [
    ("", "text_malformed"),
    ("make the car blue", "text_malformed"),
    ("{not json}", "text_malformed"),
    ('{"instruction": "make it blue"}', "text_malformed"),
    ('{"instruction": "make it blue", "edited_caption": 3}', "text_malformed"),
    ('["make it blue", "a blue car"]', "text_malformed"),
    ('{"instruction": null, "edited_caption": "a blue car"}', "text_malformed"),
    (J(instruction="", edited_caption="a blue car parked on a street"), "text_empty"),
    (J(instruction="make it blue", edited_caption="  "), "text_empty"),
    (J(instruction="!!!", edited_caption="a blue car"), "text_empty"),
    (J(instruction="make it blue " * 20, edited_caption="a blue car"), "text_too_long"),
    (J(instruction="make it blue", edited_caption="a blue car " * 40), "text_too_long"),
    # no-op: equal to the input ignoring case and punctuation
    (J(instruction="make it nicer", edited_caption="A red car, parked on a street."), "text_noop"),
    (J(instruction="make it nicer", edited_caption=SRC), "text_noop"),
    (J(instruction="blue ## car", edited_caption="a blue car parked on a street"), "text_malformed"),
]

GOOD_COMPLETION = [
    ("make the car blue" + SEP_EDIT + "a blue car parked on a street" + END,
     ("make the car blue", "a blue car parked on a street")),
    # stop sequence already stripped by the server (vllm/openai), trailing junk after END ignored
    ("make the car blue" + SEP_EDIT + "a blue car parked on a street",
     ("make the car blue", "a blue car parked on a street")),
    (" add a tree\n%%\na red car parked on a street next to a tree\nEND\n\na dog\n##\nmake it",
     ("add a tree", "a red car parked on a street next to a tree")),
]

BAD_COMPLETION = [
    ("", "text_malformed"),
    ("make the car blue", "text_malformed"),
    ("make the car blue\na blue car" + END, "text_malformed"),
    ("a\n%%\nb\n%%\nc" + END, "text_malformed"),
    ("make the car\nblue" + SEP_EDIT + "a blue car" + END, "text_malformed"),
    ("make it blue" + SEP_EDIT + "a blue car\nparked on a street" + END, "text_malformed"),
    (SEP_EDIT.lstrip("\n") + "a blue car" + END, "text_malformed"),
    ("  " + SEP_EDIT + "a blue car" + END, "text_empty"),
    ("make it blue" + SEP_EDIT + "..." + END, "text_empty"),
    ("make it nicer" + SEP_EDIT + "A red car parked on a street!" + END, "text_noop"),
    ("make it blue" + SEP_EDIT + " ".join(["car"] * 100) + END, "text_too_long"),
    ("make it ## blue" + SEP_EDIT + "a blue car" + END, "text_malformed"),
]


@pytest.mark.parametrize("text,want", GOOD_CHAT)
def test_parser_accepts_good_json(text, want):
    p = parse_edit(text, SRC, "chat")
    assert p.ok, p.reason
    assert (p.instruction, p.edited_caption) == want


@pytest.mark.parametrize("text,reason", BAD_CHAT)
def test_parser_rejects_bad_json_with_a_reason(text, reason):
    p = parse_edit(text, SRC, "chat")
    assert p.reason == reason and not p.instruction and not p.edited_caption


@pytest.mark.parametrize("text,want", GOOD_COMPLETION)
def test_parser_accepts_good_completions(text, want):
    p = parse_edit(text, SRC, "completion")
    assert p.ok, p.reason
    assert (p.instruction, p.edited_caption) == want


@pytest.mark.parametrize("text,reason", BAD_COMPLETION)
def test_parser_rejects_bad_completions_with_a_reason(text, reason):
    assert parse_edit(text, SRC, "completion").reason == reason


def test_truncated_replies_are_their_own_reason():
    half = J(instruction="make it blue", edited_caption="a blue car")[:20]
    assert parse_edit(half, SRC, "chat", finish_reason="length").reason == "text_truncated"
    assert parse_edit("make it blue\n%%\na blue ca", SRC, "completion", finish_reason="length").reason \
        == "text_truncated"
    # complete output that happened to end at the limit is still fine
    ok = J(instruction="make it blue", edited_caption="a blue car")
    assert parse_edit(ok, SRC, "chat", finish_reason="length").ok


FINAL = J(instruction="make it at night", edited_caption="a red car parked on a street at night")
DRAFT = J(instruction="make it red", edited_caption="a red car parked on a street in red")


@pytest.mark.parametrize("text", [
    # case 07: a draft object inside the think block is not the answer
    f"<think>The reply could be {DRAFT} but red is dull; night is better.</think>\n{FINAL}",
    # a lone brace in the reasoning does not make the reply malformed
    f"<think>I will answer with the {{instruction, edited_caption}} object.</think>\n{FINAL}",
    # a template that opened the block in the prompt: only the closing tag is in the reply
    f"Let me draft {DRAFT} first.\n</think>\n\n{FINAL}",
    # other spellings of the block, several blocks, upper case
    f"<thinking>{DRAFT}</thinking>{FINAL}",
    f"<THINK>{{</THINK> prose <think>{DRAFT}</think> {FINAL}",
    # the same object twice in the answer is one answer; other JSON around it is not the answer
    f"{FINAL}\nAgain: {FINAL}",
    f'{FINAL} (confidence: {{"score": 0.9}})',
])
def test_reasoning_blocks_are_never_the_answer(text):
    p = parse_edit(text, SRC, "chat")
    assert p.ok and p.instruction == "make it at night", p.reason


def test_unclosed_reasoning_and_ambiguous_answers_have_their_own_reasons():
    assert parse_edit(f"<think>maybe {DRAFT}", SRC, "chat").reason == "text_reasoning_unclosed"
    assert parse_edit(f"<think>x</think>{FINAL}<think>{DRAFT}", SRC, "chat").reason == "text_reasoning_unclosed"
    assert parse_edit(f"<think>maybe {DRAFT}", SRC, "chat", finish_reason="length").reason == "text_truncated"
    # two different edits in the final answer: which one was meant is a guess, so neither is kept
    assert parse_edit(f"{DRAFT} or {FINAL}", SRC, "chat").reason == "text_ambiguous"
    assert parse_edit("<think>x</think>", SRC, "chat").reason == "text_malformed"
    # completion format and captions strip the block too
    reply = f"<think>make it red{SEP_EDIT}x</think>make it at night{SEP_EDIT}a red car at night{END}"
    assert parse_edit(reply, SRC, "completion").instruction == "make it at night"
    assert parse_edit("<think>make it red", SRC, "completion").reason == "text_reasoning_unclosed"
    draft_cap = J(caption="a draft caption")
    assert parse_caption(f'<think>{draft_cap}</think>\n{J(caption="a dog")}', "chat").caption == "a dog"
    assert parse_caption("<think>a cat</think>\na dog\nTopic: x", "completion").caption == "a dog"
    assert parse_caption(f'{draft_cap} {J(caption="a dog")}', "chat").reason == "caption_ambiguous"
    assert parse_caption(f"<think>{draft_cap}", "chat").reason == "caption_reasoning_unclosed"


def test_limits_are_configurable_and_format_is_checked():
    text = J(instruction="make the car blue please", edited_caption="a blue car")
    assert parse_edit(text, SRC, "chat", Limits(max_instruction_words=3)).reason == "text_too_long"
    assert parse_edit(text, SRC, "chat", Limits(max_caption_words=2)).reason == "text_too_long"
    with pytest.raises(ValueError):
        parse_edit(text, SRC, "yaml")


def test_model_output_is_never_evaluated():
    evil = '{"instruction": "__import__(\'os\').system(\'false\')", "edited_caption": "x"}'
    p = parse_edit(evil, SRC, "chat")
    assert p.ok and p.instruction.startswith("__import__")       # data, not code


def test_shipped_examples_are_varied_and_pass_the_parser():
    exs = load_edit_examples()
    assert len(exs) >= 12
    assert len({e.caption for e in exs}) == len(exs)
    first_words = {e.instruction.split()[0] for e in exs}
    assert len(first_words) >= 6                  # not one template
    for e in exs:
        assert parse_edit(J(instruction=e.instruction, edited_caption=e.edited_caption), e.caption, "chat").ok
        assert parse_edit(edit_completion(e), e.caption, "completion").ok


def test_bad_examples_file_is_a_clear_error(tmp_path):
    f = tmp_path / "ex.yaml"
    f.write_text("examples:\n  - {caption: a cat, instruction: do nothing, edited_caption: A cat.}\n")
    with pytest.raises(ValueError, match="examples\\[0\\].*text_noop"):
        load_edit_examples(str(f))
    f.write_text("examples: []\n")
    with pytest.raises(ValueError, match="non-empty"):
        load_edit_examples(str(f))


def test_prompt_formats():
    exs = list(load_edit_examples()[:2])
    p = edit_prompt("  a cat on a mat ", exs)
    assert p.endswith("a cat on a mat" + SEP_PROMPT)
    assert p.startswith(exs[0].caption + SEP_PROMPT + exs[0].instruction + SEP_EDIT)
    assert p.count(END) == 2
    msgs = edit_messages("a cat on a mat", exs)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert json.loads(msgs[2]["content"]) == {"instruction": exs[0].instruction,
                                               "edited_caption": exs[0].edited_caption}
    assert msgs[-1]["content"] == "a cat on a mat"
    assert EDIT_SCHEMA["required"] == ["instruction", "edited_caption"]
    cap = load_caption_examples()
    assert caption_prompt("beach", list(cap[:1])).endswith("Topic: beach\nCaption:")
    assert caption_messages("beach", [])[-1]["content"] == "Topic: beach"
    assert CAPTION_SCHEMA["required"] == ["caption"]


def test_example_choice_is_seeded():
    exs = load_edit_examples()
    a = pick_examples(exs, 4, np.random.default_rng(1))
    assert a == pick_examples(exs, 4, np.random.default_rng(1)) and len(a) == 4
    assert pick_examples(exs, 99, np.random.default_rng(1)).__len__() == len(exs)


@pytest.mark.parametrize("text,fmt,want", [
    ('{"caption": "a dog on a beach"}', "chat", "a dog on a beach"),
    (" a dog on a beach\nTopic: x", "completion", "a dog on a beach"),
    ("{}", "chat", "caption_malformed"),
    ("nope", "chat", "caption_malformed"),
    ('{"caption": ""}', "chat", "caption_empty"),
    ("  \n", "completion", "caption_empty"),
    ("Topic: cats", "completion", "caption_malformed"),
    ('{"caption": "' + "word " * 90 + '"}', "chat", "caption_too_long"),
])
def test_caption_parser(text, fmt, want):
    p = parse_caption(text, fmt)
    assert (p.caption if p.ok else p.reason) == want
    assert parse_caption("a dog on a", "completion", finish_reason="length").reason == "caption_truncated"


class Scripted:
    """A backend stand-in: call k returns replies[k] for every request; records the seeds."""

    format = "chat"

    def __init__(self, *replies):
        self.replies, self.seeds = list(replies), []

    def describe(self):
        return {"model": "scripted"}

    def generate(self, requests):
        from datagen.text.llm import Reply

        self.seeds.append([r.seed for r in requests])
        k = len(self.seeds) - 1
        return [Reply(self.replies[k](r)) for r in requests]


def _editor(gen, attempts):
    from datagen.recipe import load_gen_recipe
    from datagen.text.llm import LLMEditor

    r = load_gen_recipe("shapes-high", ["captions.source=file", "captions.path=x.txt", "edits.backend=openai",
                                        "edits.llm.model=m", f"edits.llm.attempts={attempts}"])
    return LLMEditor(r, generator=gen)


def _cands(n):
    from datagen.candidate import Candidate, candidate_seed

    out = []
    for j in range(n):
        c = Candidate(0, j, candidate_seed(0, 0, j))
        c.source_caption = f"a red car {j}"
        out.append(c)
    return out


def test_rejected_replies_are_resampled_up_to_attempts():
    noop = lambda r: J(instruction="keep", edited_caption=r.messages[-1]["content"])   # noqa: E731
    good = lambda r: J(instruction="make it blue", edited_caption="a blue car")          # noqa: E731
    one = _cands(3)
    _editor(Scripted(noop), 1)(one)
    assert [c.reject_reason for c in one] == ["text_noop"] * 3
    assert one[0].generator["edits"]["raw"] and one[0].generator["edits"]["attempt"] == 1
    gen = Scripted(noop, good)
    two = _cands(3)
    _editor(gen, 2)(two)
    assert all(c.kept for c in two) and two[0].generator["edits"]["attempt"] == 2
    assert "raw" not in two[0].generator["edits"]
    assert gen.seeds[0] == [c.generator["edits"]["seed"] for c in one]    # attempt 1 is the same draw
    assert gen.seeds[1] == [c.generator["edits"]["seed"] for c in two] and gen.seeds[1] != gen.seeds[0]
    # only the candidates that failed are asked again, with the seed they would get anyway
    mixed = Scripted(lambda r: noop(r) if r.messages[-1]["content"].endswith("1") else good(r), good)
    three = _cands(3)
    _editor(mixed, 3)(three)
    assert len(mixed.seeds) == 2 and len(mixed.seeds[1]) == 1 and mixed.seeds[1][0] == gen.seeds[1][1]
    assert all(c.kept for c in three)
