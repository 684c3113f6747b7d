"""Perceptual hash, near-duplicate removal and the benchmark contamination check."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from datagen.candidate import Candidate
from datagen.base.config import ConfigError
from datagen.contamination import ContaminationFilter, gallery_files, load_gallery
from datagen.dedupe import DedupeFilter, hamming, nearest, phash, phashes
from datagen.world.render import RenderConfig, encode, render
from datagen.world.scene import Obj, Scene, sample_scene

CFG = RenderConfig(resolution=128)


def _scene(k: int) -> Scene:
    """Distinct, busy scenes (4 objects) so their hashes are far apart."""
    return sample_scene(np.random.default_rng(k), 4, 4)


def _img(scene: Scene, seed: int = 0, fmt: str = "png") -> bytes:
    return encode(render(scene, seed, CFG), fmt)


def test_phash_identical_zero_noise_small_different_scenes_large():
    s = _scene(0)
    a = phash(_img(s))
    assert a.dtype == np.uint64 and a.shape == (1,)
    assert hamming(a, phash(_img(s))) == 0                              # deterministic
    assert hamming(a, phash(Image.open(io.BytesIO(_img(s))))) == 0     # bytes or PIL
    # Same scene, other pixel noise and colour jitter, JPEG-compressed: a few bits at most.
    assert hamming(a, phash(_img(s, seed=7, fmt="jpeg"))) <= 6
    far = [int(hamming(a, phash(_img(_scene(k))))) for k in range(1, 9)]
    assert min(far) > 12 and np.mean(far) > 20, far
    assert phash(_img(s), "rgb").shape == (3,)


def test_phash_matches_the_reference_definition():
    # DCT-II of the 32x32 grey image, top-left 8x8, bit = coefficient > median (scipy as reference).
    from scipy.fftpack import dct

    img = Image.open(io.BytesIO(_img(_scene(3)))).convert("L").resize((32, 32), Image.LANCZOS)
    x = np.asarray(img, dtype=np.float64)
    low = dct(dct(x, axis=0), axis=1)[:8, :8]
    bits = (low > np.median(low)).flatten()
    want = int("".join("1" if b else "0" for b in bits), 2)
    assert int(phash(_img(_scene(3)))[0]) == want


def test_hamming_and_nearest():
    a = np.array([[0b1011], [0]], dtype=np.uint64)
    b = np.array([[0b0001], [np.uint64(2**64 - 1)]], dtype=np.uint64)
    assert hamming(a[:, None], b[None]).tolist() == [[2, 61], [1, 64]]
    d, pos = nearest(a, b)
    assert d.tolist() == [2, 1] and pos.tolist() == [0, 0]
    assert nearest(a, b[:0])[0].tolist() == [-1, -1]


def _cand(unit: int, j: int, ref: bytes, tgt: bytes) -> Candidate:
    c = Candidate(unit, j, j)
    c.reference_image, c.target_image = ref, tgt
    return c


def test_dedupe_rejects_repeats_of_an_earlier_kept_triplet_and_stores_the_distance():
    imgs = [_img(_scene(k)) for k in range(6)]
    noisy0 = _img(_scene(0), seed=3, fmt="jpeg")
    rows = [(imgs[0], imgs[1]), (imgs[2], imgs[3]), (noisy0, imgs[1]),   # 2: near-copy of 0
            (imgs[0], imgs[4]),                                            # 3: same ref, other target
            (imgs[2], imgs[3]), (imgs[4], imgs[5])]                        # 4: exact copy of 1
    f = DedupeFilter(max_distance=6, match="pair")
    batch = [_cand(0, j, r, t) for j, (r, t) in enumerate(rows)]
    f(batch)
    assert [c.reject_reason for c in batch] == [None, None, "near_duplicate", None, "near_duplicate", None]
    assert batch[0].scores["score_dedupe_phash"] is None and batch[0].passes["pass_dedupe"] is True
    assert batch[4].scores["score_dedupe_phash"] == 0.0
    assert 0 < batch[2].scores["score_dedupe_phash"] <= 6
    assert batch[3].scores["score_dedupe_phash"] > 6

    # `either`: any image seen before counts, so the shared reference of row 3 is a duplicate.
    f = DedupeFilter(max_distance=6, match="either")
    batch = [_cand(0, j, r, t) for j, (r, t) in enumerate(rows)]
    f(batch)
    assert sum(c.reject_reason == "near_duplicate" for c in batch) == 3 and batch[3].reject_reason

    # Batching does not matter; a new unit starts a fresh index; rejected candidates never enter it.
    f = DedupeFilter(max_distance=6)
    one_by_one = [_cand(0, j, r, t) for j, (r, t) in enumerate(rows)]
    for c in one_by_one:
        f([c])
    assert [c.reject_reason for c in one_by_one] == [None, None, "near_duplicate", None, "near_duplicate", None]
    other_unit = _cand(1, 0, imgs[0], imgs[1])
    f([other_unit])
    assert other_unit.kept
    f = DedupeFilter(max_distance=6)
    first = _cand(2, 0, imgs[0], imgs[1])
    first.reject("clip_dir")
    second = _cand(2, 1, imgs[0], imgs[1])
    f([first, second])
    assert second.kept and first.reject_reason == "clip_dir" and first.passes["pass_dedupe"] is True


def test_contamination_flags_a_copy_of_a_gallery_image(tmp_path):
    gallery = tmp_path / "bench" / "images"
    (gallery / "dev").mkdir(parents=True)
    bench = [_scene(k) for k in range(10, 16)]
    for k, s in enumerate(bench):
        (gallery / "dev" / f"img{k}.png").write_bytes(_img(s))
    (gallery / "notes.txt").write_text("not an image")
    assert len(gallery_files(gallery)) == 6
    cache = tmp_path / "cache"
    f = ContaminationFilter([str(tmp_path / "bench")], max_distance=6, cache_dir=str(cache))
    leaked = _img(bench[2], seed=9, fmt="jpeg")          # the benchmark image, re-rendered + JPEG
    batch = [_cand(0, 0, _img(_scene(1)), _img(_scene(2))), _cand(0, 1, _img(_scene(3)), leaked),
             _cand(0, 2, _img(bench[4]), _img(_scene(4)))]
    f(batch)
    assert [c.reject_reason for c in batch] == [None, "contaminated", "contaminated"]
    assert batch[0].scores["score_contamination_phash"] > 6 and batch[0].passes["pass_contamination"]
    assert batch[1].scores["score_contamination_phash"] <= 6 and not batch[1].passes["pass_contamination"]
    assert batch[2].scores["score_contamination_phash"] == 0.0
    assert len(list(cache.glob("phash-*.npz"))) == 1


def test_gallery_hashes_are_cached_and_recomputed_when_the_folder_changes(tmp_path, monkeypatch):
    g = tmp_path / "g"
    g.mkdir()
    for k in range(3):
        (g / f"{k}.png").write_bytes(_img(_scene(20 + k)))
    first = load_gallery(g)
    assert (g / ".cirgen-cache").is_dir() and first.files == ["0.png", "1.png", "2.png"]
    import datagen.contamination as cont

    monkeypatch.setattr(cont, "phashes", lambda *a, **k: pytest.fail("recomputed a cached gallery"))
    again = load_gallery(g)
    assert np.array_equal(again.hashes, first.hashes)
    monkeypatch.undo()
    (g / "3.png").write_bytes(_img(_scene(30)))
    assert len(load_gallery(g).files) == 4
    assert len(list((g / ".cirgen-cache").glob("phash-*.npz"))) == 2


def test_missing_gallery_is_a_config_error(tmp_path):
    f = ContaminationFilter([str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="nope"):
        f([_cand(0, 0, _img(_scene(1)), _img(_scene(2)))])


def test_phashes_of_many_images():
    imgs = [_img(Scene((Obj("circle", "red", "large", k),), "white")) for k in range(3)]
    h = phashes(imgs)
    assert h.shape == (3, 1) and len({int(x) for x in h[:, 0]}) == 3


class _ColourScorer:
    """CLIP stand-in: the unit mean colour of an image as its feature."""
    model_id = "colour@0"

    def image_features(self, images):
        from datagen.clip_scores import to_pil

        f = np.stack([np.asarray(to_pil(im), np.float32).reshape(-1, 3).mean(0) + 1.0 for im in images])
        return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_contamination_by_clip_similarity_uses_cached_gallery_features(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    red = Scene((Obj("circle", "red", "large", 4),), "black")
    (g / "a.png").write_bytes(_img(red))
    scorer = _ColourScorer()
    f = ContaminationFilter([str(g)], max_distance=0, clip_threshold=0.999, scorer_factory=lambda: scorer)
    assert f.score_columns == ["score_contamination_phash", "score_contamination_clip"]
    # Same colours, other shape and place: pHash far, "CLIP" close.
    similar = Scene((Obj("square", "red", "large", 0),), "black")
    batch = [_cand(0, 0, _img(similar), _img(_scene(5))), _cand(0, 1, _img(_scene(6)), _img(_scene(7)))]
    f(batch)
    assert batch[0].reject_reason == "contaminated" and batch[0].scores["score_contamination_clip"] > 0.999
    assert batch[0].scores["score_contamination_phash"] > 0
    assert batch[1].kept and batch[1].scores["score_contamination_clip"] < 0.999
    assert len(list((g / ".cirgen-cache").glob("clip-*.npz"))) == 1
