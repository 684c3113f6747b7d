"""Feature cache: the frozen image tower runs once per image, not once per epoch or run.

Features are keyed by (model name, weights hash, preprocessing, dataset content id) and stored
as `.npy` files (global embeddings fp32, patch tokens fp16, memory-mapped on read). A cache entry
is written to a temp folder and renamed when complete, so an interrupted computation never
leaves a half entry behind. Images that fail to decode are an error, or with `on_error="skip"`
are marked invalid in `valid.npy` and counted.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datagen.config import stable_hash


def default_cache_root() -> Path:
    return Path(os.environ.get("CIRGEN_CACHE", Path.home() / ".cache" / "cirgen")) / "features"


@dataclass
class Features:
    global_: np.ndarray               # [N, D] float32, L2-normalised
    patch: np.ndarray | None          # [N, P, W] float16 (memmap) or None
    valid: np.ndarray                 # [N] bool
    ids: list[str]

    def tensors(self, idx) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.from_numpy(np.array(self.global_[idx], dtype=np.float32))
        p = None if self.patch is None else torch.from_numpy(np.asarray(self.patch[idx], dtype=np.float32))
        return g, p


class FeatureCache:
    def __init__(self, clip, root: str | Path | None = None):
        self.clip = clip
        self.root = Path(root) if root else default_cache_root()
        self.model_key = stable_hash({"model": clip.name, "weights": clip.weights_id,
                                      "preprocess": repr(clip.preprocess)})
        self.computed = 0   # images encoded by this instance (for tests and benchmarks)

    def entry(self, dataset_id: str) -> Path:
        return self.root / self.model_key / dataset_id

    @torch.no_grad()
    def image_features(self, dataset_id: str, n: int, image: Callable[[int], object], ids: list[str],
                       patches: bool = False, batch_size: int = 128, on_error: str = "raise",
                       progress: bool = False) -> Features:
        entry = self.entry(dataset_id)
        if (entry / "meta.json").exists():
            meta = json.loads((entry / "meta.json").read_text())
            if meta["n"] == n and (meta["patches"] or not patches):
                return self._open(entry, ids, patches)
        tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        clip = self.clip
        dev = next(clip.clip.parameters()).device
        g_out = np.lib.format.open_memmap(tmp / "global.npy", "w+", np.float32, (n, clip.embed_dim))
        p_out = None
        valid = np.ones(n, dtype=bool)
        from tqdm import tqdm

        bar = tqdm(total=n, desc="image features", unit="img", disable=not progress)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            xs = []
            for i in idx:
                try:
                    xs.append(clip.preprocess(image(i)))
                except ValueError:
                    if on_error == "raise":
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
                    valid[i] = False
                    xs.append(torch.zeros_like(xs[-1]) if xs else None)
            if any(x is None for x in xs):
                ref = next(x for x in xs if x is not None)
                xs = [torch.zeros_like(ref) if x is None else x for x in xs]
            x = torch.stack(xs).to(dev)
            if patches:
                g, p = clip.image_features(x, patches=True)
                if p_out is None:
                    p_out = np.lib.format.open_memmap(tmp / "patch.npy", "w+", np.float16, (n,) + tuple(p.shape[1:]))
                p_out[idx[0]:idx[-1] + 1] = p.float().cpu().numpy().astype(np.float16)
            else:
                g = clip.image_features(x)
            g_out[idx[0]:idx[-1] + 1] = torch.nn.functional.normalize(g.float(), dim=-1).cpu().numpy()
            self.computed += len(idx)
            bar.update(len(idx))
        bar.close()
        g_out.flush()
        if p_out is not None:
            p_out.flush()
        del g_out, p_out
        np.save(tmp / "valid.npy", valid)
        (tmp / "ids.json").write_text(json.dumps(ids))
        (tmp / "meta.json").write_text(json.dumps({"n": n, "patches": patches, "model": self.clip.name,
                                                   "weights": self.clip.weights_id,
                                                   "invalid": int((~valid).sum())}))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        return self._open(entry, ids, patches)

    def _open(self, entry: Path, ids: list[str], patches: bool) -> Features:
        stored = json.loads((entry / "ids.json").read_text())
        if stored != ids:
            raise ValueError(f"{entry}: cached ids differ from the dataset's (same content id, other ids)")
        g = np.load(entry / "global.npy", mmap_mode="r")
        p = np.load(entry / "patch.npy", mmap_mode="r") if patches and (entry / "patch.npy").exists() else None
        return Features(np.asarray(g), p, np.load(entry / "valid.npy"), stored)

    @torch.no_grad()
    def text_features(self, dataset_id: str, texts: list[str], batch_size: int = 512) -> np.ndarray:
        """Frozen caption features [N, D] (normalised), cached like image features."""
        entry = self.entry(dataset_id) / f"text-{stable_hash(texts)}.npy"
        if entry.exists():
            return np.load(entry)
        clip = self.clip
        dev = next(clip.clip.parameters()).device
        out = [clip.encode_text(clip.tokenize(texts[i:i + batch_size]).to(dev), normalize=True).float().cpu()
               for i in range(0, len(texts), batch_size)]
        arr = torch.cat(out).numpy()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(entry.name + f".tmp{os.getpid()}.npy")
        np.save(tmp, arr)
        os.replace(tmp, entry)
        return arr
