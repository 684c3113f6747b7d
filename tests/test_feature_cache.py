"""Feature cache keys name the content (not path strings); temp entries never outlive their process;
a trained model reports prompts whose placeholder the text context cuts off."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cir.clip import CIRClip
from cir.features import FeatureCache, FileDigests, content_id
from cir.mapping import MappingConfig
from cir.model import CIRModel, RunModel


@pytest.fixture(scope="module")
def clip():
    return CIRClip.load("shapes-clip", random_init=True)


def _pictures(folder, colors):
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colors):
        Image.new("RGB", (32, 32), c).save(folder / f"img{i}.png")
    return [folder / f"img{i}.png" for i in range(len(colors))]


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_trained_model_features_follow_file_content(tmp_path, clip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunModel(CIRModel(clip, MappingConfig(vsi=False)), "tiny", cache_root=str(tmp_path / "cache"))
    a = _pictures(tmp_path / "A" / "bench", COLORS)
    b = _pictures(tmp_path / "B" / "bench", COLORS[1:] + COLORS[:1])   # same names, other pictures
    fa = run.encode_images(a)
    assert run.cache.computed == 3
    os.chdir(tmp_path / "B")
    fb = run.encode_images([p.relative_to(tmp_path / "B") for p in b])  # same relative strings as in A
    assert run.cache.computed == 6 and torch.allclose(fb, fa[[1, 2, 0]], atol=1e-6)
    assert not torch.allclose(fb, fa, atol=1e-3)
    # A copy with the same content elsewhere reuses the entry (nothing re-encoded).
    c = tmp_path / "C"
    shutil.copytree(tmp_path / "A" / "bench", c)
    assert torch.equal(run.encode_images(sorted(c.iterdir())), fa) and run.cache.computed == 6
    # Overwritten in place, with size and mtime restored: re-encoded.
    st = [p.stat() for p in a]
    for p, q, s in zip(a, b, st):
        p.write_bytes(q.read_bytes())
        os.utime(p, ns=(s.st_atime_ns, s.st_mtime_ns))
    fa2 = run.encode_images(a)                   # now B's bytes: B's entry serves it, rightly
    assert torch.allclose(fa2, fb, atol=1e-6) and run.cache.computed == 6
    s0 = a[0].stat()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(a[0])     # a picture no entry holds
    os.utime(a[0], ns=(s0.st_atime_ns, s0.st_mtime_ns))
    fa3 = run.encode_images(a)
    assert run.cache.computed == 9 and not torch.allclose(fa3[0], fa2[0], atol=1e-3)


def test_file_digests_are_remembered_per_file_version(tmp_path):
    files = _pictures(tmp_path / "g", COLORS)
    memo = FileDigests(tmp_path / "cache")
    first = memo.digests(files)
    assert memo.hashed == 3 and len(set(first)) == 3
    assert memo.digests(files) == first and memo.hashed == 3          # remembered
    files[0].write_bytes(files[1].read_bytes())
    again = memo.digests(files)
    assert again[0] == first[1] and memo.hashed == 4                  # the rewritten one only
    assert FileDigests(tmp_path / "cache").digests(files, strict=False) == again
    assert FileDigests(tmp_path / "cache").digests([tmp_path / "nope.png"], strict=False) == ["unreadable"]


def test_csv_source_id_is_its_images_content(tmp_path):
    from cir.data import DataConfig, open_source

    ids = []
    for name, colors in (("one", COLORS), ("two", COLORS[::-1]), ("three", COLORS)):
        _pictures(tmp_path / name, colors)
        (tmp_path / name / "pairs.csv").write_text("image,caption\n" + "".join(f"img{i}.png,c{i}\n" for i in range(3)))
        ids.append(open_source(DataConfig(source="csv", path=str(tmp_path / name / "pairs.csv"))).dataset_id)
    assert ids[0] != ids[1] and ids[0] == ids[2]       # same names, other pictures / same pictures
    assert content_id([b"x", b"y"]) != content_id([b"y", b"x"])


def test_temp_entries_of_dead_processes_are_removed_and_errors_leave_none(tmp_path, clip):
    cache = FeatureCache(clip, tmp_path)
    folder = tmp_path / cache.model_key
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = os.getppid()
    for name in (f"shapes-x.tmp{dead}", f"shapes-x.tmp{dead}@{socket.gethostname()}",
                 f"shapes-y.tmp{live}", f"shapes-z.tmp{dead}@another-host"):
        (folder / name).mkdir(parents=True)
    (folder / "files-1").mkdir()
    (folder / "files-1" / f"text-ab.npy.tmp{dead}.npy").write_bytes(b"")
    cache = FeatureCache(clip, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["files-1", f"shapes-y.tmp{live}",
                                                        f"shapes-z.tmp{dead}@another-host"]
    assert list((folder / "files-1").iterdir()) == []

    def image(i):
        if i == 2:
            raise KeyboardInterrupt          # Ctrl-C in the middle of filling an entry
        return Image.new("RGB", (16, 16))

    with pytest.raises(KeyboardInterrupt):
        cache.image_features("broken", 4, image, ["a", "b", "c", "d"], batch_size=2)
    assert not any(".tmp" in p.name and str(os.getpid()) in p.name for p in folder.iterdir())
    assert not (folder / "broken").exists()


def test_prompt_problems_reports_a_cut_placeholder(clip):
    run = RunModel(CIRModel(clip, MappingConfig(vsi=False, n_tokens=2)), "tiny")
    long = " ".join(["very"] * 80)
    from cir.prompts import QueryPrompt, fill_template

    prompts = [fill_template("a photo of * that {}", long), QueryPrompt(f"{long} , in a photo of ", ""),
               fill_template("a photo of * that {}", "is red *")]
    out = run.prompt_problems(prompts)
    assert list(out) == [1] and f"{clip.context_length}-token" in out[1]
    assert np.all([isinstance(v, str) for v in out.values()])


def _colour(i: int) -> Image.Image:
    return Image.new("RGB", (24 + i % 5, 24), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256))


def test_decoding_workers_change_nothing_and_keep_the_error_semantics(tmp_path, clip):
    """Decoding in 2 worker processes gives the features, invalid rows and errors of decoding in
    the process: same order, same pixels, the same exception with the same one-line message."""
    from datagen.base.images import ImageError

    def image(i):
        if i in (3, 7, 8, 9, 10, 11):         # 3 alone in its batch; in batch 6..11 all but 6
            raise ImageError(f"row {i}: image cannot be decoded")
        return _colour(i)

    ids = [str(i) for i in range(20)]
    got = {}
    for w in (0, 2):
        cache = FeatureCache(clip, tmp_path / f"w{w}", num_workers=w)
        got[w] = cache.image_features("x", 20, image, ids, patches=True, batch_size=6, bad_rows="skip")
        assert cache.computed == 20
        with pytest.raises(ImageError) as e:
            cache.image_features("y", 20, image, ids, batch_size=6)
        assert str(e.value) == "row 3: image cannot be decoded"
        assert not (tmp_path / f"w{w}" / cache.model_key / "y").exists()
    a, b = got[0], got[2]
    assert np.array_equal(a.global_, b.global_) and np.array_equal(np.asarray(a.patch), np.asarray(b.patch))
    assert a.valid.tolist() == b.valid.tolist() == [i not in (3, 7, 8, 9, 10, 11) for i in range(20)]
    # A failed row holds the features of a blank image (as decoding in the process gave), never
    # another row's.
    assert (a.global_[7:12] == a.global_[7]).all() and not np.array_equal(a.global_[7], a.global_[6])


def test_a_batch_whose_images_all_fail_is_skipped_not_a_crash(tmp_path, clip):
    def image(i):
        if i < 4:
            raise ValueError(f"row {i}: bad")
        return _colour(i)

    f = FeatureCache(clip, tmp_path).image_features("x", 8, image, list("abcdefgh"), batch_size=4, bad_rows="skip")
    assert f.valid.tolist() == [False] * 4 + [True] * 4 and np.abs(f.global_[4:]).sum() > 0


def test_interrupt_in_a_decoding_worker_leaves_no_entry_and_no_worker(tmp_path, clip):
    import time

    def image(i):
        if i == 5:
            raise KeyboardInterrupt
        return _colour(i)

    import psutil

    before = {p.pid for p in psutil.Process().children()}
    cache = FeatureCache(clip, tmp_path, num_workers=2)
    with pytest.raises(KeyboardInterrupt):
        cache.image_features("broken", 12, image, [str(i) for i in range(12)], batch_size=2)
    assert not any(p.name.startswith("broken") for p in (tmp_path / cache.model_key).iterdir())

    def workers():
        return [p for p in psutil.Process().children() if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    deadline = time.time() + 10
    while workers() and time.time() < deadline:
        time.sleep(0.1)
    assert workers() == []


def test_default_decoding_workers_are_none_for_small_sets():
    from cir.features import SMALL_SET, default_decode_workers

    assert default_decode_workers(SMALL_SET - 1) == 0
    cpus = len(os.sched_getaffinity(0))
    assert default_decode_workers(10 * SMALL_SET) == max(0, min(4, cpus - 1))
