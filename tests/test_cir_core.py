"""cir core: the CLIP wrapper's text path, pseudo tokens, VSI, stage I resume/DDP, bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cir.clip import CIRClip, inject_pseudo_tokens
from cir.mapping import MappingConfig
from cir.model import CIRModel
from cir.prompts import PromptError, QueryPrompt
from datagen.base.errors import InputError

PROMPTS = ["a photo of $ that is red and large", "hello world", "a small red circle at the top left on a "
           "white background and a large blue star in the center", "$"]


@pytest.fixture(scope="module")
def shapes_clip():
    return CIRClip.load("shapes-clip", random_init=True)


@pytest.mark.parametrize("name", ["shapes-clip", "ViT-B-32"])
def test_plain_text_path_equals_open_clip(name, shapes_clip):
    clip = shapes_clip if name == "shapes-clip" else CIRClip.load(name, random_init=True)
    toks = clip.tokenize(PROMPTS)
    with torch.no_grad():
        ref = clip.clip.encode_text(toks)
        exact = clip.encode_text(toks, truncate=False)
        fast = clip.encode_text(toks, normalize=True)
    assert (exact - ref).abs().max().item() <= 1e-6
    assert (fast - torch.nn.functional.normalize(ref, dim=-1)).abs().max().item() <= 1e-6


def test_placeholder_embedding_as_pseudo_token_reproduces_encode_text(shapes_clip):
    clip = shapes_clip
    prompts = ["a photo of * that is red and large", "* on white", "a photo of *"]
    toks, ph = clip.tokenize_queries(prompts)
    assert torch.equal(toks, clip.tokenize(prompts))        # same ids as open_clip's tokenizer here
    star = toks[0, ph[0]].item()
    own = clip.clip.token_embedding.weight[star].detach()
    with torch.no_grad():
        a = clip.encode_text(toks, pseudo=own.expand(len(prompts), 1, -1), placeholder_index=ph, truncate=False)
        b = clip.clip.encode_text(toks)
        c = clip.encode_text(toks, pseudo=torch.randn(len(prompts), 1, own.shape[0]), placeholder_index=ph,
                             truncate=False)
    assert torch.equal(a, b)
    assert not torch.allclose(c[0], b[0])


def test_several_pseudo_tokens_fill_placeholders_in_order():
    x = torch.zeros(1, 6, 2)
    is_ph = torch.tensor([[False, True, True, True, False, False]])
    pseudo = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    y = inject_pseudo_tokens(x, is_ph, pseudo)
    assert y[0, :, 0].tolist() == [0, 1, 2, 3, 0, 0]


def test_placeholder_lost_to_truncation_is_an_error(shapes_clip):
    long = QueryPrompt("word " * 80, "")
    with pytest.raises(PromptError, match="outside the 64-token text context"):
        shapes_clip.tokenize_queries([long])


def test_gated_vsi_with_zero_gates_equals_the_plain_pseudo_token_encoder(shapes_clip):
    torch.manual_seed(0)
    m = CIRModel(shapes_clip, MappingConfig(vsi="gated", vsi_layers="all", dropout=0.0)).eval()
    g = torch.nn.functional.normalize(torch.randn(3, shapes_clip.embed_dim), dim=-1)
    p = torch.randn(3, 64, shapes_clip.vision_width)
    prompts = ["a photo of *", "a photo of * that is blue", "* on white"]
    with torch.no_grad():
        with_vsi = m.encode_query(g, p, prompts)
        vsi, m.mapping.vsi = m.mapping.vsi, None
        plain = m.encode_query(g, None, prompts)
        m.mapping.vsi = vsi
        for blk in vsi.blocks.values():
            blk.gate.fill_(0.5)
        opened = m.encode_query(g, p, prompts)
    assert torch.equal(with_vsi, plain)
    assert (opened - plain).abs().max() > 1e-4


def _stage1(tmp, out, *sets, resume=False):
    cmd = [sys.executable, "-m", "cir.cli", "stage1", "--out", str(out),
           "--set", "clip.random_init=true", "--set", "data.n=320", "--set", "train.batch_size=64",
           "--set", "train.epochs=2", "--set", "eval.scenes=50", "--set", f"cache_dir={tmp / 'cache'}",
           "--set", "train.threads=1"]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_stage1_resume_is_bitwise_identical_and_features_are_cached(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = _stage1(tmp_path, full)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((full / "result.json").read_text())
    # 2 reference + 2 target augmented views of each of the 320 images, encoded once.
    assert res["images_encoded"] == 4 * 320 and "pseudo_r1" in res["eval"]
    r = _stage1(tmp_path, cut, "train.stop_after=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (cut / "model.safetensors").exists()
    r = _stage1(tmp_path, cut, resume=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    # Same features from the cache: the second and third runs encoded no image.
    assert json.loads((cut / "result.json").read_text())["images_encoded"] == 0
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_ddp_two_processes_match_one_process(tmp_path):
    # The gated VSI: TSCIR's injectors hold BatchNorm, which (as released, no SyncBatchNorm)
    # normalises each rank's share of the batch, so 2 ranks and 1 differ by design; everything
    # else of the step (gathered losses, gradient averaging, views) is checked here.
    sets = ["clip.random_init=true", "data.n=256", "train.batch_size=64", "train.epochs=1",
            "mapping.dropout=0.0", f"cache_dir={tmp_path / 'cache'}", "eval.scenes=20", "train.threads=1",
            "mapping.vsi=gated", "mapping.vsi_layers=all"]
    args = [x for s in sets for x in ("--set", s)]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "cir.cli", "stage1", "--out", str(one), *args],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        "-m", "cir.cli", "stage1", "--out", str(two), *args],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    # Stated tolerance: fp32 reductions happen in another order across ranks.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def test_corrupt_image_and_bad_caption_rows(tmp_path):
    from cir.data import DataConfig, DataError, open_source
    from cir.features import FeatureCache

    Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image,caption\nok.png,a red square\nbroken.png,a broken file\nok.png,\n")
    with pytest.raises(DataError, match=r"pairs.csv line 4: empty caption"):
        open_source(DataConfig(source="csv", path=str(csv_path)))
    src = open_source(DataConfig(source="csv", path=str(csv_path), bad_rows="skip"))
    assert len(src) == 2 and src.skipped == 1
    with pytest.raises(DataError, match=r"pairs.csv line 3: image cannot be decoded"):
        src.image(1)
    clip = CIRClip.load("shapes-clip", random_init=True)
    cache = FeatureCache(clip, tmp_path / "cache")
    with pytest.raises(DataError, match="line 3"):
        cache.image_features(src.dataset_id, len(src), src.image, src.ids)
    f = cache.image_features(src.dataset_id, len(src), src.image, src.ids, bad_rows="skip")
    assert f.valid.tolist() == [True, False]
    (tmp_path / "esc.csv").write_text("image,caption\n../../etc/passwd,x\n")
    src = open_source(DataConfig(source="csv", path=str(tmp_path / "esc.csv")))
    with pytest.raises(DataError, match="escapes"):
        src.image(0)


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    from safetensors.torch import save_file

    from datagen.base.clip_loader import load_weights_file

    clip = CIRClip.load("shapes-clip", random_init=True)
    bad = {k: v for k, v in clip.clip.state_dict().items()}
    bad["text_projection"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors.*shape mismatch at 'text_projection'"):
        load_weights_file(clip.clip, tmp_path / "other.safetensors")
    m = CIRModel(clip, MappingConfig(vsi=False))
    m.save(tmp_path / "run")
    m2 = CIRModel(clip, MappingConfig(vsi=False, n_tokens=2))
    with pytest.raises(ValueError, match="token_learner"):
        m2.load_trained(tmp_path / "run" / "model.safetensors")


def test_a_trained_weights_file_must_hold_exactly_the_trained_keys(tmp_path):
    """Missing weights are one line (not torch's RuntimeError); full fine-tuning loads the text
    tower only: image-tower keys in the file are refused, not silently loaded."""
    from safetensors.torch import load_file, save_file

    from cir.adapters import ComposeConfig

    clip = CIRClip.load("shapes-clip", random_init=True)
    m = CIRModel(clip, MappingConfig(vsi=False))
    m.save(tmp_path / "run")
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    first = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != first}, str(tmp_path / "short.safetensors"))
    with pytest.raises(InputError, match=rf"short.safetensors: 1 weight\(s\) .* missing \(first: '{first}'\)"):
        m.load_trained(tmp_path / "short.safetensors")

    full = CIRModel(clip, MappingConfig(vsi=False))
    full.clip.freeze()
    full.add_composer(ComposeConfig(mode="full"))
    full.save(tmp_path / "full")
    state = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert state and not any(k.startswith("clip.visual.") for k in state)
    full.load_trained(tmp_path / "full" / "model.safetensors")              # its own file loads
    visual = next(k for k in clip.clip.state_dict() if k.startswith("visual."))
    state[f"clip.{visual}"] = clip.clip.state_dict()[visual].contiguous()
    save_file(state, str(tmp_path / "with_visual.safetensors"))
    with pytest.raises(InputError, match="unexpected key 'clip.visual"):
        full.load_trained(tmp_path / "with_visual.safetensors")


def test_parquet_and_webdataset_sources(tmp_path):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cir.data import DataConfig, open_source

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, format="PNG")
    png = buf.getvalue()
    pq.write_table(pa.table({"image": [{"bytes": png, "path": None}] * 2, "caption": ["a", "b"]}),
                   tmp_path / "d.parquet")
    src = open_source(DataConfig(source="parquet", path=str(tmp_path / "d.parquet")))
    assert len(src) == 2 and src.image(1).size == (8, 8) and src.caption(1) == "b"
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, data in (("k0.jpg", png), ("k0.txt", b"blue square"), ("k1.png", png), ("k1.txt", b"x")):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = open_source(DataConfig(source="webdataset", path=str(tmp_path / "s.tar")))
    assert len(src) == 2 and src.caption(0) == "blue square" and np.asarray(src.image(0)).shape == (8, 8, 3)


def test_unreadable_stage1_sources_are_one_data_error_naming_the_file(tmp_path):
    from cir.data import DataConfig, DataError, open_source

    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    (tmp_path / "x.parquet").write_bytes(b"nope")
    cases = [("csv", tmp_path / "missing.csv", "missing.csv: No such file or directory (ENOENT)"),
             ("webdataset", tmp_path / "*.tar", "bad.tar: not a readable tar archive"),
             ("webdataset", tmp_path / "*.none", "matches no file"),            # absolute glob, no match
             ("parquet", tmp_path / "x.parquet", "x.parquet: cannot read columns"),
             ("hf_disk", tmp_path / "nothere", "nothere")]
    for source, path, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            open_source(DataConfig(source=source, path=str(path)))
