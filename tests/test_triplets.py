"""Stage-II triplet readers against the real layouts of the released data: TransAgg's Laion-CIR files
(zero-padded image names), CIRR train (images found through image_splits/), CompoDiff's
SynthTriplets18M (WebDataset samples), and cirgen folders read in two passes (filter columns first,
image bytes only for the chosen rows). Every input is made here, small, in tmp_path."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cir.data import DataError
from cir.triplets import TripletsConfig, load_triplets
from datagen.schema import FORMAT, build_schema


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, (7 * i) % 256, 99)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- TransAgg

def transagg_files(tmp_path):
    """Both released shapes (ZS-CIR data/files/): the template list and the ChatGPT dict keyed by
    the reference id; images named str(id).zfill(7) + '.png' (ids 1000.., and one 8-digit id)."""
    img = tmp_path / "images"
    img.mkdir()
    refs, tgts = ["1000", "1001", "20", "12345678"], ["2000", "2001", "21", "87654321"]
    for k, i in enumerate(refs + tgts):
        (img / f"{i.zfill(7)}.png").write_bytes(png(k))
    template = [{"ref_image_id": r, "relative_cap": f"add {k} circles.", "tgt_image_id": t}
                for k, (r, t) in enumerate(zip(refs, tgts))]
    llm = {r: {"tgt_image_id": t, "relative_cap": f"Change {k}.", "tgt_cap": "A photo."}
           for k, (r, t) in enumerate(zip(refs, tgts))}
    (tmp_path / "laion_template_info.json").write_text(json.dumps(template))
    (tmp_path / "laion_llm_info.json").write_text(json.dumps(llm))
    return tmp_path, img


@pytest.mark.parametrize("name,ids", [("laion_template_info.json", ["0", "1", "2", "3"]),
                                      ("laion_llm_info.json", ["1000", "1001", "20", "12345678"])])
def test_transagg_released_files_load_with_zero_padded_image_names(tmp_path, name, ids):
    d, img = transagg_files(tmp_path)
    t = load_triplets(TripletsConfig(format="transagg", path=str(d / name), image_root=str(img)))
    assert t.ids == ids and t.skipped == 0
    assert [p.name for p in t.reference] == ["0001000.png", "0001001.png", "0000020.png", "12345678.png"]
    assert [p.name for p in t.target] == ["0002000.png", "0002001.png", "0000021.png", "87654321.png"]
    assert t.image(2, "ref").size == (4, 4)


def test_transagg_image_root_defaults_to_the_json_folder_and_int_ids_work(tmp_path):
    (tmp_path / "0000005.png").write_bytes(png(1))
    (tmp_path / "0000006.png").write_bytes(png(2))
    f = tmp_path / "laion_template_info.json"
    f.write_text(json.dumps([{"ref_image_id": 5, "relative_cap": "add a dog.", "tgt_image_id": 6}]))
    t = load_triplets(TripletsConfig(format="transagg", path=str(f)))
    assert [p.name for p in t.reference + t.target] == ["0000005.png", "0000006.png"]


def test_transagg_missing_image_is_an_error_naming_the_entry_or_a_counted_skip(tmp_path):
    d, img = transagg_files(tmp_path)
    (img / "0002001.png").unlink()
    cfg = TripletsConfig(format="transagg", path=str(d / "laion_llm_info.json"), image_root=str(img))
    with pytest.raises(DataError, match=r"laion_llm_info.json entry 1001: target: image '2001' not found"):
        load_triplets(cfg)
    cfg.bad_rows = "skip"
    t = load_triplets(cfg)
    assert t.skipped == 1 and t.ids == ["1000", "20", "12345678"]


@pytest.mark.parametrize("bad", ["../outside", "/etc/hostname"])
def test_transagg_ids_that_leave_the_image_root_are_refused_even_when_skipping(tmp_path, bad):
    d, img = transagg_files(tmp_path)
    (tmp_path / "outside.png").write_bytes(png(0))      # a real image outside the root
    f = d / "laion_template_info.json"
    f.write_text(json.dumps([{"ref_image_id": bad, "relative_cap": "add x.", "tgt_image_id": "2000"}]))
    with pytest.raises(DataError, match=r"laion_template_info.json entry 0: path .* leaves .*images"):
        load_triplets(TripletsConfig(format="transagg", path=str(f), image_root=str(img), bad_rows="skip"))


def test_transagg_malformed_entries_are_one_line_errors(tmp_path):
    f = tmp_path / "laion_template_info.json"
    f.write_text(json.dumps(["not an object"]))
    with pytest.raises(DataError, match=r"laion_template_info.json entry 0: expected an object, got str"):
        load_triplets(TripletsConfig(format="transagg", path=str(f)))
    f.write_text("3")
    with pytest.raises(DataError, match=r"expected a list .* or an object keyed by reference id"):
        load_triplets(TripletsConfig(format="transagg", path=str(f)))
    with pytest.raises(DataError, match=r"nope.json: No such file"):
        load_triplets(TripletsConfig(format="transagg", path=str(tmp_path / "nope.json")))


# ----------------------------------------------------------------------------- CIRR

def cirr_train(tmp_path, n=4):
    """Official layout: captions/cap.rc2.train.json, image_splits/split.rc2.train.json mapping each
    name to ./train/<k>/<name>.png, images in numbered sub-folders."""
    root = tmp_path / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    caps, split = [], {}
    for i in range(n):
        ref, tgt = f"train-{100 + i}-0-img0", f"train-{100 + i}-1-img1"
        for j, name in enumerate((ref, tgt)):
            rel = f"./train/{i % 2}/{name}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png(2 * i + j))
            split[name] = rel
        caps.append({"pairid": i, "reference": ref, "target_hard": tgt, "caption": f"make it {i}",
                     "img_set": {"id": i, "members": [ref, tgt]}, "target_soft": {tgt: 1.0}})
    (root / "captions" / "cap.rc2.train.json").write_text(json.dumps(caps))
    (root / "image_splits" / "split.rc2.train.json").write_text(json.dumps(split))
    return root


@pytest.mark.parametrize("image_root", [None, "root"])
def test_cirr_train_official_layout_resolves_names_through_image_splits(tmp_path, image_root):
    root = cirr_train(tmp_path)
    t = load_triplets(TripletsConfig(format="cirr", path=str(root / "captions" / "cap.rc2.train.json"),
                                     image_root=str(root) if image_root else None))
    assert len(t) == 4 and t.skipped == 0
    assert t.reference[1] == (root / "train" / "1" / "train-101-0-img0.png").resolve()
    assert t.target[2] == (root / "train" / "0" / "train-102-1-img1.png").resolve()
    assert t.modification == ["make it 0", "make it 1", "make it 2", "make it 3"]


@pytest.mark.parametrize("bad", ["../../outside.png", "/etc/hostname"])
def test_cirr_split_entries_that_leave_the_root_are_refused(tmp_path, bad):
    root = cirr_train(tmp_path)
    (tmp_path / "outside.png").write_bytes(png(0))
    spl = root / "image_splits" / "split.rc2.train.json"
    m = json.loads(spl.read_text())
    m["train-101-1-img1"] = bad
    spl.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"split.rc2.train.json entry 'train-101-1-img1': path .* leaves"):
        load_triplets(TripletsConfig(format="cirr", path=str(root / "captions" / "cap.rc2.train.json"),
                                     bad_rows="skip"))


def test_cirr_names_missing_from_the_split_and_entries_without_target_are_counted(tmp_path):
    root = cirr_train(tmp_path)
    cap = root / "captions" / "cap.rc2.train.json"
    caps = json.loads(cap.read_text())
    caps[1]["reference"] = "train-999-0-img0"
    del caps[2]["target_hard"]
    cap.write_text(json.dumps(caps))
    with pytest.raises(DataError, match=r"cap.rc2.train.json entry 1: reference: image 'train-999-0-img0' is "
                                        r"not in split.rc2.train.json"):
        load_triplets(TripletsConfig(format="cirr", path=str(cap)))
    t = load_triplets(TripletsConfig(format="cirr", path=str(cap), bad_rows="skip"))
    assert t.skipped == 2 and t.ids == ["0", "3"]


def test_cirr_without_split_file_still_reads_a_flat_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(png(1))
    (tmp_path / "b.jpg").write_bytes(png(2))
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([{"reference": "a", "target_hard": "b", "caption": "x"}]))
    t = load_triplets(TripletsConfig(format="cirr", path=str(f)))
    assert [p.name for p in t.reference + t.target] == ["a.png", "b.jpg"]


# ----------------------------------------------------------------------------- SynthTriplets18M

def synth_samples(n=6):
    """WebDataset samples as the TSCIR reader finds them: <key>.source_image.jpg,
    <key>.target_image.jpg, <key>.json {source_caption, target_caption}."""
    out = []
    for i in range(n):
        key = f"{i:09d}"
        meta = {"source_caption": f"a cat {i}", "target_caption": f"a dog {i}"}
        out += [(f"{key}.source_image.jpg", png(2 * i)), (f"{key}.target_image.jpg", png(2 * i + 1)),
                (f"{key}.json", json.dumps(meta).encode())]
    return out


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_synthtriplets_tar_shards_target_caption_is_the_text_and_bytes_are_exact(tmp_path):
    shards = tmp_path / "SynthTriplets18M"
    shards.mkdir()
    members = synth_samples(6)
    write_tar(shards / "00000.tar", members[:9])
    write_tar(shards / "00001.tar", members[9:])
    t = load_triplets(TripletsConfig(format="synthtriplets18m", path=str(shards)))
    assert t.ids == [f"0000{s}.tar:{i:09d}" for s, i in [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]]
    assert t.modification == [f"a dog {i}" for i in range(6)]
    assert t.reference[4] == png(8) and t.target[4] == png(9)
    assert t.image(0, "tgt").size == (4, 4)
    # one shard by path, and a glob, read the same samples
    one = load_triplets(TripletsConfig(format="synthtriplets18m", path=str(shards / "00001.tar")))
    assert one.modification == ["a dog 3", "a dog 4", "a dog 5"]
    glob = load_triplets(TripletsConfig(format="synthtriplets18m", path=str(shards / "*.tar")))
    assert glob.ids == t.ids
    # subsample: deterministic and nested
    a = load_triplets(TripletsConfig(format="synthtriplets18m", path=str(shards), max_triplets=2))
    b = load_triplets(TripletsConfig(format="synthtriplets18m", path=str(shards), max_triplets=4))
    assert len(a) == 2 and set(a.ids) <= set(b.ids)


def test_synthtriplets_bad_samples_are_errors_naming_shard_and_key_or_counted_skips(tmp_path):
    members = synth_samples(5)
    members[2] = ("000000000.json", json.dumps({"source_caption": "a", "target_caption": " "}).encode())
    members = [m for m in members if m[0] != "000000001.target_image.jpg"]
    members = [(n, b"\xff\xd8 not a jpeg") if n == "000000003.source_image.jpg" else (n, d) for n, d in members]
    members.append(("000000004.json", b"{broken"))
    tar = tmp_path / "00000.tar"
    write_tar(tar, members)
    cfg = TripletsConfig(format="synthtriplets18m", path=str(tar))
    with pytest.raises(DataError, match=r"00000.tar sample 000000000: empty target_caption"):
        load_triplets(cfg)
    cfg.bad_rows = "skip"
    t = load_triplets(cfg)
    assert t.ids == ["00000.tar:000000002"] and t.skipped == 4


def test_synthtriplets_extracted_folder(tmp_path):
    d = tmp_path / "extracted"
    d.mkdir()
    for name, data in synth_samples(3):
        (d / name).write_bytes(data)
    t = load_triplets(TripletsConfig(format="synthtriplets18m", path=str(d)))
    assert t.ids == ["000000000", "000000001", "000000002"]
    assert t.modification == ["a dog 0", "a dog 1", "a dog 2"]
    assert t.target[1] == (d / "000000001.target_image.jpg").resolve()


def test_synthtriplets_compressed_or_missing_input_is_a_one_line_error(tmp_path):
    gz = tmp_path / "x.tar"
    with tarfile.open(gz, "w:gz") as tf:
        info = tarfile.TarInfo("0.json")
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match=r"x.tar: not an uncompressed tar shard"):
        load_triplets(TripletsConfig(format="synthtriplets18m", path=str(gz)))
    with pytest.raises(DataError, match=r"nothing: not found"):
        load_triplets(TripletsConfig(format="synthtriplets18m", path=str(tmp_path / "nothing")))


# ----------------------------------------------------------------------------- cirgen folders

def cirgen_folder(tmp_path, n=40, shards=2, rows_per_group=5):
    """A real cirgen dataset (so every reader check passes) whose rows are then rewritten in place,
    keeping ids, seeds and footers: item i = unit * (n // shards) + row gets images png(2i),
    png(2i + 1), score_x = i / n, pass_x = i even, failure 'drift' when i % 3 == 0."""
    from conftest import SMALL
    from datagen.pipeline import generate
    from datagen.recipe import load_gen_recipe

    root = tmp_path / "ds"
    per = n // shards
    generate(load_gen_recipe("shapes-high", SMALL + [f"pipeline.unit_size={per}"]), root, n, workers=1,
             progress=False, log=lambda s: None)
    for path in sorted((root / "shards").glob("*.parquet")):
        t = pq.read_table(path)
        schema = t.schema.append(pa.field("score_x", pa.float64())).append(pa.field("pass_x", pa.bool_()))
        rows = t.to_pylist()
        for row in rows:
            i = num(row["id"], per)
            row.update(modification_text=f"edit {i}", failure="none" if i % 3 else "drift",
                       reference_image={"bytes": png(2 * i), "path": None},
                       target_image={"bytes": png(2 * i + 1), "path": None}, score_x=i / n, pass_x=i % 2 == 0)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=rows_per_group)
    return root


def num(tid: str, per: int = 20) -> int:
    """Item number of a cirgen id `UUUUUU-RRRRRR` with `per` rows per unit."""
    unit, row = tid.split("-")
    return int(unit) * per + int(row)


def test_cirgen_reads_filter_columns_first_and_image_bytes_only_of_chosen_row_groups(tmp_path, monkeypatch):
    root = cirgen_folder(tmp_path)
    batches_cols, groups = [], []
    real_batches, real_group = pq.ParquetFile.iter_batches, pq.ParquetFile.read_row_group

    def spy_batches(self, *a, columns=None, **kw):
        batches_cols.append(tuple(columns or ()))
        return real_batches(self, *a, columns=columns, **kw)

    def spy_group(self, i, columns=None, **kw):
        groups.append((i, tuple(columns or ())))
        return real_group(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_batches)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy_group)
    t = load_triplets(TripletsConfig(path=str(root), conditions=["score_x>=0.5", "pass_x==true"], max_triplets=3))
    assert batches_cols and all(set(c) == {"score_x", "pass_x"} for c in batches_cols)  # no image column
    assert len(t) == 3 and t.filtered_out == 30                  # 10 of 40 rows pass both filters
    assert len(groups) <= 3                                       # at most one row group per chosen row
    nums = [num(i) for i in t.ids]
    assert all(k >= 20 and k % 2 == 0 for k in nums)
    assert [t.reference[k] for k in range(3)] == [png(2 * k) for k in nums]
    assert t.where[0].endswith(f"000001.parquet row {nums[0] - 20}")
    # without filters no column is scanned at all; the row counts come from the footers
    batches_cols.clear()
    assert len(load_triplets(TripletsConfig(path=str(root), max_triplets=5))) == 5 and batches_cols == []


def test_cirgen_unchosen_rows_are_never_decoded(tmp_path):
    root = cirgen_folder(tmp_path, n=20, shards=1)
    shard = root / "shards" / "000000.parquet"
    rows = pq.read_table(shard).to_pylist()
    for r in rows[10:]:
        r["target_image"] = {"bytes": b"\x89PNG broken", "path": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard, row_group_size=5)
    t = load_triplets(TripletsConfig(path=str(root), conditions=["score_x<0.5"]))
    assert len(t) == 10 and t.skipped == 0
    with pytest.raises(DataError, match=r"000000.parquet row 10 \(id 000000-000010\): corrupt target image"):
        load_triplets(TripletsConfig(path=str(root)))


def test_cirgen_filter_errors_are_one_line(tmp_path):
    root = cirgen_folder(tmp_path, n=10, shards=1)
    with pytest.raises(DataError, match=r"000000.parquet row 0: filter on 'failure' compares a number with the "
                                        r"text 'drift'"):
        load_triplets(TripletsConfig(path=str(root), conditions=["failure>=0.2"]))
    with pytest.raises(DataError, match=r"only == and != compare with text"):
        load_triplets(TripletsConfig(path=str(root), conditions=["failure<drift"]))
    assert len(load_triplets(TripletsConfig(path=str(root), conditions=["pass_x==false"]))) == 5
    assert len(load_triplets(TripletsConfig(path=str(root), conditions=["failure==drift"]))) == 4


def test_cirgen_unreadable_shard_names_the_file(tmp_path):
    root = cirgen_folder(tmp_path, n=10, shards=1)
    (root / "shards" / "000000.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(Exception, match=r"000000.parquet: unreadable") as e:
        load_triplets(TripletsConfig(path=str(root)))
    from datagen.base.errors import CirgenError
    assert isinstance(e.value, CirgenError)
