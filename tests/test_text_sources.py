"""Caption sources: readers, bad rows, near-duplicates, deterministic assignment, LLM captions,
and the text stage inside `run_unit` (stats count every reject reason)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datagen.candidate import Candidate, candidate_seed
from datagen.captions import build_captions
from datagen.base.config import ConfigError
from datagen.edits import build_edits
from datagen.unit import Stages, run_unit
from datagen.recipe import load_gen_recipe
from datagen.text.assign import SlotAssigner, permute
from datagen.text.dedup import NearDupIndex, jaccard, word_set
from datagen.text.llm import Reply
from datagen.text.sources import CaptionSourceError, LLMCaptions, build_pool, read_rows

CAPS = ["a dog running on the beach", "a red car parked on a street", "two cats sleeping on a sofa",
        "a bowl of apples on a wooden table", "a man riding a horse in a field",
        "a boat on a lake at sunset", "children playing football in a park", "a lamp next to a bed"]


def recipe_for(path, *extra):
    return load_gen_recipe("shapes-high", ["captions.source=file", f"captions.path={path}",
                                           "edits.backend=keywords", "pipeline.unit_size=10",
                                           "pipeline.batch_size=4", *extra])


def batch_of(unit, js, seed=0):
    return [Candidate(unit, j, candidate_seed(seed, unit, j)) for j in js]


# ---- readers and bad rows ---------------------------------------------------------------------

def test_all_file_formats_give_the_same_pool(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(CAPS) + "\n")
    with open(tmp_path / "c.csv", "w") as f:
        f.write("id,caption,url\n" + "".join(f'{i},"{c}",http://x/{i}\n' for i, c in enumerate(CAPS)))
    (tmp_path / "c.tsv").write_text("caption\n" + "\n".join(CAPS) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"caption": c, "n": 1}) + "\n" for c in CAPS))
    pq.write_table(pa.table({"caption": CAPS, "k": list(range(len(CAPS)))}), tmp_path / "c.parquet")
    pools = {}
    for name in ("c.txt", "c.csv", "c.tsv", "c.jsonl", "c.parquet"):
        pools[name] = build_pool(read_rows(tmp_path / name, "caption"), name=name)
    assert all(p.captions == CAPS for p in pools.values())
    assert pools["c.txt"].rows[:2] == [1, 2] and pools["c.csv"].rows[:2] == [2, 3]
    assert pools["c.parquet"].rows[:2] == [0, 1]
    assert len({p.fingerprint for p in pools.values()}) == 1


def test_hf_dataset_on_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": CAPS}).save_to_disk(str(tmp_path / "ds"))
    DatasetDict({"train": Dataset.from_dict({"text": CAPS[:4]}),
                 "test": Dataset.from_dict({"text": CAPS[4:]})}).save_to_disk(str(tmp_path / "dd"))
    assert build_pool(read_rows(tmp_path / "ds", "text", kind="hf_disk")).captions == CAPS
    assert build_pool(read_rows(tmp_path / "dd", "text", "test", kind="hf_disk")).captions == CAPS[4:]
    with pytest.raises(CaptionSourceError, match="captions.split"):
        list(read_rows(tmp_path / "dd", "text", kind="hf_disk"))
    with pytest.raises(CaptionSourceError, match="no column 'caption'.*text"):
        list(read_rows(tmp_path / "ds", "caption", kind="hf_disk"))
    r = recipe_for(tmp_path / "ds", "captions.source=hf_disk", "captions.column=text")
    src = build_captions(r)
    b = batch_of(0, range(3))
    src(b)
    assert all(c.source_caption in CAPS for c in b)


def test_bad_rows_name_file_and_line_or_are_counted(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text('caption,n\n"a dog",1\n"",2\n"a cat",3,extra\n"a cow",4\n')
    with pytest.raises(CaptionSourceError, match=r"c\.csv:3: empty caption"):
        build_pool(read_rows(f, "caption"))
    pool = build_pool(read_rows(f, "caption"), bad_rows="skip")
    assert pool.captions == ["a dog", "a cow"]
    assert pool.report["bad_rows"] == 2 and pool.report["rows"] == 4
    assert any("c.csv:4: expected 2 fields, got 3" in s for s in pool.report["first_bad_rows"])

    t = tmp_path / "c.txt"
    t.write_bytes(b"a dog\n\na cat\n\xff\xfe bad\n")
    with pytest.raises(CaptionSourceError, match=r"c\.txt:2: empty caption"):
        build_pool(read_rows(t))
    pool = build_pool(read_rows(t), bad_rows="skip")
    assert pool.captions == ["a dog", "a cat"] and pool.report["bad_rows"] == 2

    j = tmp_path / "c.jsonl"
    j.write_text('{"caption": "a dog"}\n{"caption": \n{"text": "x"}\n')
    with pytest.raises(CaptionSourceError, match=r"c\.jsonl:2: malformed JSON"):
        build_pool(read_rows(j))
    assert build_pool(read_rows(j), bad_rows="skip").report["bad_rows"] == 2

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": ["a dog", None, "  "]}), p)
    with pytest.raises(CaptionSourceError, match=r"c\.parquet row 1: missing value"):
        build_pool(read_rows(p))
    with pytest.raises(CaptionSourceError, match="no column 'text'"):
        list(read_rows(p, "text"))
    with pytest.raises(CaptionSourceError, match="not found"):
        read_rows(tmp_path / "nope.txt")
    with pytest.raises(CaptionSourceError, match="unknown caption file type"):
        (tmp_path / "c.xml").write_text("x")
        read_rows(tmp_path / "c.xml")
    with pytest.raises(CaptionSourceError, match="no captions left"):
        (tmp_path / "e.txt").write_text("\n\n")
        build_pool(read_rows(tmp_path / "e.txt"), bad_rows="skip", name="e.txt")


def test_csv_column_missing_is_a_clear_error(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("text,n\na,1\n")
    with pytest.raises(CaptionSourceError, match=r"c\.csv:1: no column 'caption' \(columns: text, n\)"):
        list(read_rows(f))


def test_over_long_captions_are_skipped_and_counted(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a dog\n" + "word " * 30 + "\na cat\n")
    pool = build_pool(read_rows(f), max_words=20)
    assert pool.captions == ["a dog", "a cat"] and pool.report["too_long"] == 1


# ---- near-duplicates ----------------------------------------------------------------------------

def test_near_duplicates_are_removed_and_counted(tmp_path):
    rows = ["A dog on the beach.", "a dog on the beach", "a  dog on a beach", "a dog on the beach at noon",
            "two dogs playing in the park", "two dogs playing in the snow", "a cat on a mat"]
    f = tmp_path / "c.txt"
    f.write_text("\n".join(rows) + "\n")
    pool = build_pool(read_rows(f), near_threshold=0.8)
    assert pool.captions == ["A dog on the beach.", "a dog on the beach at noon",
                             "two dogs playing in the park", "two dogs playing in the snow", "a cat on a mat"]
    assert pool.report["exact_duplicates"] == 1 and pool.report["near_duplicates"] == 1
    assert build_pool(read_rows(f), dedup="exact").report["near_duplicates"] == 0
    assert len(build_pool(read_rows(f), dedup="none").captions) == len(rows)
    assert jaccard(word_set("a dog on the beach"), word_set("a dog on a beach")) == pytest.approx(0.8)


def test_minhash_index_finds_the_near_duplicates_brute_force_finds():
    import random

    r = random.Random(3)
    vocab = [f"w{i}" for i in range(60)]
    base = [[r.choice(vocab) for _ in range(r.randint(6, 12))] for _ in range(150)]
    texts = []
    for words in base:
        texts.append(" ".join(words))
        if r.random() < 0.5:                         # a one-word variant: a near duplicate
            w = list(words)
            w[r.randrange(len(w))] = r.choice(vocab)
            texts.append(" ".join(w))
    ix = NearDupIndex(0.7)
    kept_lsh = [t for t in texts if ix.add(t)]
    kept_bf: list[str] = []
    for t in texts:
        if all(jaccard(word_set(t), word_set(k)) < 0.7 for k in kept_bf):
            kept_bf.append(t)
    missed = len(kept_lsh) - len(kept_bf)
    assert 0 <= missed <= 0.02 * len(texts)          # LSH may miss a few, never over-removes
    assert set(kept_bf) <= set(kept_lsh)


# ---- deterministic assignment -------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(m):
    assert sorted(permute(i, m, seed=5, epoch=0) for i in range(m)) == list(range(m))


def test_permutation_depends_on_seed_and_epoch():
    a = [permute(i, 1000, 0, 0) for i in range(50)]
    assert a == [permute(i, 1000, 0, 0) for i in range(50)]
    assert a != [permute(i, 1000, 1, 0) for i in range(50)]
    assert a != [permute(i, 1000, 0, 1) for i in range(50)]


def test_units_use_disjoint_captions_while_the_pool_lasts():
    a = SlotAssigner(m=10_000, seed=0, stride=40)
    used = [a.index(u, j) for u in range(100) for j in range(40)]
    assert len(set(used)) == len(used)             # 100 units x 40 candidates, no repeats
    small = SlotAssigner(m=50, seed=0, stride=40)
    counts = {}
    for u in range(10):
        for j in range(40):
            counts[small.index(u, j)] = counts.get(small.index(u, j), 0) + 1
    assert len(counts) == 50 and max(counts.values()) - min(counts.values()) <= 1   # even reuse


def test_caption_of_a_candidate_depends_only_on_seed_unit_and_j(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(f"caption number {i} of a dog" for i in range(500)) + "\n")
    r = recipe_for(f, "captions.dedup=exact")
    s1, s2 = build_captions(r), build_captions(r)
    b1, b2 = batch_of(3, range(12)), batch_of(3, [11, 5, 0])   # other batches, other order
    s1(b1)
    s2(b2)
    by_j = {c.j: c.source_caption for c in b1}
    assert all(by_j[c.j] == c.source_caption for c in b2)
    assert len(set(by_j.values())) == 12
    assert b1[0].generator["captions"]["row"] >= 1 and b1[0].generator["captions"]["pool"]
    other = build_captions(r, seed=1)
    b3 = batch_of(3, range(12))
    other(b3)
    assert [c.source_caption for c in b3] != [c.source_caption for c in b1]
    seq = build_captions(recipe_for(f, "captions.order=sequential", "captions.dedup=exact"))
    b4 = batch_of(0, range(3))
    seq(b4)
    assert [c.source_caption for c in b4] == [f"caption number {i} of a dog" for i in range(3)]


def test_recipe_validation_of_caption_sources():
    with pytest.raises(ConfigError, match="needs path"):
        load_gen_recipe("shapes-high", ["captions.source=file"])
    with pytest.raises(ConfigError, match="topics"):
        load_gen_recipe("shapes-high", ["captions.source=llm", "captions.llm.model=x"])
    with pytest.raises(ConfigError, match="bad_rows"):
        load_gen_recipe("shapes-high", ["captions.bad_rows=ignore"])
    with pytest.raises(ConfigError, match="needs llm.model"):
        load_gen_recipe("shapes-high", ["edits.backend=vllm"])


# ---- LLM-written captions -----------------------------------------------------------------------

class ScriptedLLM:
    """A backend stand-in: replies by topic from a script, records what it was asked."""

    def __init__(self, fmt="chat", script=None):
        self.format, self.script, self.requests = fmt, script or {}, []

    def describe(self):
        return {"model": "scripted"}

    def generate(self, requests):
        self.requests += requests
        out = []
        for r in requests:
            topic = r.messages[-1]["content"].split(": ", 1)[1] if r.messages else r.prompt.rsplit("Topic: ", 1)[1].split("\n")[0]
            out.append(self.script.get(topic, Reply(json.dumps({"caption": f"a photo about {topic}"}))))
        return out


def test_llm_captions_are_parsed_deduplicated_per_unit_and_rejects_counted():
    r = load_gen_recipe("shapes-high", ["captions.source=llm", "captions.llm.model=scripted",
                                        "captions.topics=[beach, city, forest, kitchen, snow]",
                                        "edits.backend=keywords", "pipeline.unit_size=5"])
    gen = ScriptedLLM(script={"city": Reply("not json"), "snow": Reply(error="timeout"),
                              "kitchen": Reply(json.dumps({"caption": "a photo about beach"}))})
    src = LLMCaptions(r, generator=gen)
    b = batch_of(0, range(10))
    src(b[:4])
    src(b[4:])                                       # a second batch of the same unit
    reasons = {}
    for c in b:
        reasons[c.reject_reason] = reasons.get(c.reject_reason, 0) + 1
    topics = [c.generator["captions"]["topic"] for c in b]
    assert sorted(set(topics)) == ["beach", "city", "forest", "kitchen", "snow"]
    assert reasons.get("caption_malformed") == topics.count("city")
    assert reasons.get("caption_timeout") == topics.count("snow")
    # kitchen's caption duplicates beach's; both topics produce it, only the first one is kept
    kept_beach = [c for c in b if c.kept and c.source_caption == "a photo about beach"]
    assert len(kept_beach) == 1
    assert reasons.get("caption_duplicate") == \
        (topics.count("beach") + topics.count("kitchen") - 1) + (topics.count("forest") - 1)
    assert all(r.schema is not None and r.seed >= 0 for r in gen.requests)
    # a new unit starts with an empty duplicate index
    b2 = batch_of(1, range(5))
    src(b2)
    assert any(c.kept and c.source_caption == "a photo about beach" for c in b2)


def test_llm_captions_completion_format():
    r = load_gen_recipe("shapes-high", ["captions.source=llm", "captions.llm.model=scripted",
                                        "captions.topics=[beach]", "edits.backend=keywords"])
    gen = ScriptedLLM("completion", {"beach": Reply(" a dog on the sand\nTopic: y")})
    src = LLMCaptions(r, generator=gen)
    b = batch_of(0, range(2))
    src(b)
    assert [c.source_caption for c in b] == ["a dog on the sand", "a dog on the sand"]
    assert b[1].reject_reason == "caption_duplicate"
    assert gen.requests[0].prompt.endswith("Topic: beach\nCaption:") and gen.requests[0].stop == ["\n"]


# ---- the text stage inside run_unit -------------------------------------------------------------

class StubImages:
    """Stands in for an image backend (shapes images need scenes; real ones need models)."""

    name = "stub"

    def __call__(self, batch):
        for c in batch:
            c.reference_image = c.target_image = b"\x89PNG stub"


def test_run_unit_counts_text_rejects_by_reason(tmp_path):
    f = tmp_path / "c.txt"
    rows = CAPS + ["zzz qqq xxx", "nothing to swap here yyy"] * 3
    f.write_text("\n".join(f"{c} {i}" if c.startswith(("zzz", "nothing")) else c
                           for i, c in enumerate(rows)) + "\n")
    r = recipe_for(f)
    stages = Stages.__new__(Stages)
    stages.recipe = r
    stages.captions, stages.edits = build_captions(r), build_edits(r)
    stages.images, stages.filters = StubImages(), []
    out = tmp_path / "ds"
    (out / "shards").mkdir(parents=True)
    (out / "rejects").mkdir()
    st = run_unit(r, 0, 0, 10, out, stages)
    assert st.kept == 10
    assert st.rejected.get("text_no_keyword", 0) >= 1
    assert st.generated == st.kept + sum(st.rejected.values())
    assert all(k.startswith("keyword_") for k in st.edit_types)
    rej = pq.read_table(out / "rejects" / "000000.parquet").to_pylist()
    assert {x["reject_reason"] for x in rej} == {"text_no_keyword"}
    kept = pq.read_table(out / "shards" / "000000.parquet").to_pylist()
    for x in kept:
        g = json.loads(x["generator"])
        assert g["captions"]["backend"] == "file" and g["edits"]["backend"] == "keywords"
        assert x["source_caption"] != x["target_caption"] and x["modification_text"]
    # the same unit again gives the same records
    out2 = tmp_path / "ds2"
    (out2 / "shards").mkdir(parents=True)
    (out2 / "rejects").mkdir()
    run_unit(r, 0, 0, 10, out2, stages)
    strip = lambda rows: [{k: v for k, v in x.items() if not k.startswith("seconds_")} for x in rows]  # noqa: E731
    assert strip(pq.read_table(out2 / "shards" / "000000.parquet").to_pylist()) == strip(kept)


# ---- every input text file: control characters, counts, checked before anything is written ------

def test_nul_rows_are_bad_rows_and_control_characters_are_replaced_and_counted(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"a dog\n\x00\x00\x00\na red\x07car\x1b[0m here\nhalf\x00nul\na cat\n")
    with pytest.raises(CaptionSourceError, match=r"c\.txt:2: contains NUL characters"):
        build_pool(read_rows(f))
    pool = build_pool(read_rows(f), bad_rows="skip")
    assert pool.captions == ["a dog", "a red car [0m here", "a cat"]
    assert not any(ch in c for c in pool.captions for ch in "\x00\x07\x1b")
    assert pool.report["bad_rows"] == 2 and pool.report["control_chars"] == 1
    assert "c.txt:4: contains NUL" in pool.report["first_bad_rows"][1]
    # the same rules for columnar sources
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": ["a dog\x00", "a\x7fcat"]}), p)
    pool = build_pool(read_rows(p), bad_rows="skip")
    assert pool.captions == ["a cat"] and pool.report["bad_rows"] == 1 and pool.report["control_chars"] == 1


def test_character_long_lines_count_as_too_long_without_max_words(tmp_path):
    from datagen.text.sources import MAX_CAPTION_CHARS

    f = tmp_path / "c.txt"
    f.write_text("a dog\n" + "x" * 10_000 + "\n" + "a cat " * 2000 + "\na cat\n")
    pool = build_pool(read_rows(f))
    assert pool.captions == ["a dog", "a cat"] and pool.report["too_long"] == 2
    assert all(len(c) <= MAX_CAPTION_CHARS for c in pool.captions)


def test_empty_file_and_nothing_left_name_the_file_and_the_counts(tmp_path):
    from datagen.text.sources import pool_counts

    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(CaptionSourceError, match=r"e\.txt: no caption rows"):
        build_pool(read_rows(tmp_path / "e.txt"), name=str(tmp_path / "e.txt"))
    (tmp_path / "b.txt").write_bytes(b"\xff\n\x00\n")
    with pytest.raises(CaptionSourceError, match=r"b\.txt: no captions left after cleaning \(2 rows, 0 captions "
                                                 r"kept; dropped: 2 bad rows\); first: .*b\.txt:1: not valid UTF-8"):
        build_pool(read_rows(tmp_path / "b.txt"), bad_rows="skip", name="b.txt")
    report = {"rows": 14, "bad_rows": 2, "control_chars": 1, "too_long": 1, "exact_duplicates": 5,
              "near_duplicates": 1, "captions": 5}
    assert pool_counts(report) == ("14 rows, 5 captions kept; dropped: 2 bad rows, 1 too long, 5 exact "
                                   "duplicates, 1 near duplicates; control characters replaced in 1 rows")


def _real(path, *extra):
    """A real-caption recipe (diffusion images: nothing loads before the input check)."""
    return recipe_for(path, "images.backend=diffusers-paired", "images.diffusion.model=/nonexistent/sd", *extra)


@pytest.mark.parametrize("content, match", [
    (b"", r"no caption rows"),
    (b"a dog\n\x00\n", r"c\.txt:2: contains NUL"),
    (b"a dog\n\xff\n", r"c\.txt:2: not valid UTF-8"),
])
def test_a_bad_caption_file_fails_before_the_dataset_folder_is_written(tmp_path, content, match):
    from datagen.pipeline import generate

    f = tmp_path / "c.txt"
    f.write_bytes(content)
    out = tmp_path / "ds"
    with pytest.raises(CaptionSourceError, match=match):
        generate(_real(f), out, 4, progress=False, log=lambda s: None, workers=1)
    assert not out.exists()


def test_check_text_inputs_reads_every_input_file(tmp_path):
    from datagen.text.sources import check_text_inputs

    f = tmp_path / "c.txt"
    f.write_text("a dog\na dog\na cat\n")
    report = check_text_inputs(_real(f))
    assert report["source"] == "c.txt" and report["captions"] == 2 and report["exact_duplicates"] == 1
    vocab = tmp_path / "v.yaml"
    vocab.write_text("categories: [1, 2]\ntemplates: {generic: ['{target}']}\n")
    with pytest.raises(ConfigError, match=r"v\.yaml: not a keyword vocabulary"):
        check_text_inputs(_real(f, f"edits.vocabulary={vocab}"))
    ex = tmp_path / "ex.yaml"
    ex.write_bytes(b"examples: [\xff]\n")
    with pytest.raises(ConfigError, match=r"ex\.yaml: cannot read examples"):
        check_text_inputs(_real(f, "edits.backend=openai", "edits.llm.model=m", f"edits.examples_file={ex}"))
    topics = tmp_path / "t.txt"
    topics.write_bytes(b"dogs\n# a comment\nca\x00ts\n")
    with pytest.raises(CaptionSourceError, match=r"t\.txt:3: contains NUL"):
        check_text_inputs(_real(f, "captions.source=llm", "captions.llm.model=m", f"captions.topics_file={topics}"))
