"""`transformers` text backend: any causal LM (hub id, local folder, GGUF file) on CPU or GPU.

Batched generation with left padding. Sampling is seeded per request: `generate` runs greedy
over the scores of `SeededSampler`, which applies temperature/top-p and draws each row's token
from that row's own `torch.Generator`, so a request's text depends on its seed, not on which
other requests share its batch (up to padding numerics). Chat models get their chat template;
base models the few-shot completion format (auto-detected from `tokenizer.chat_template`).
`trust_remote_code` stays off unless a recipe turns it on.
"""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

from ..base.device import resolve_device, resolve_dtype
from ..base.threads import record_threads
from .protocol import Reply, Request, prompt_format

_LOCK = threading.Lock()


def resolve_model(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None). Accepts a path to a .gguf file and
    `pypi:<package>` for a model shipped as a Python package that exposes `assemble()`.
    Raises RuntimeError when that package is not installed or has no `assemble()`."""
    if model.startswith("pypi:"):
        import importlib

        pkg = model[5:].replace("-", "_")
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise RuntimeError(f"model {model!r}: the package is not installed "
                               f"(pip install {model[5:]})") from None
        if not hasattr(mod, "assemble"):
            raise RuntimeError(f"model {model!r}: the package has no assemble() giving a model file")
        model = str(mod.assemble())
    if model.endswith(".gguf") and gguf_file is None:
        p = Path(model)
        return str(p.parent), p.name
    return model, gguf_file


@lru_cache(maxsize=2)
def load_model(model: str, gguf_file: str | None, revision: str | None, dtype: str, device: str,
               trust_remote_code: bool):
    """Tokenizer and model, loaded once per process and shared by the caption and edit stages.
    The tokenizer pads on the left. Raises ValueError for an unknown `dtype`, and transformers' own
    errors (OSError, ...) for a model it cannot find or load."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(model, **kw)
    tok.padding_side = "left"     # decoder-only batches must be left padded
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    # transformers >= 4.56 calls it `dtype`; older versions ignore unknown kwargs silently.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dkey = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    lm = AutoModelForCausalLM.from_pretrained(model, **kw, **{dkey: resolve_dtype(dtype, device)})
    lm.to(device).eval()
    return tok, lm


def _sampler_class():
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        """Samples each row with its own generator and returns scores that make greedy pick it."""

        def __init__(self, seeds: list[int], temperature: float, top_p: float, device: str):
            # Generators live where the scores are: no per-step copy of (batch x vocab) to the host.
            self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
            self.temperature, self.top_p = temperature, top_p

        def __call__(self, input_ids, scores):
            s = scores.float()
            if self.temperature <= 0:
                idx = s.argmax(-1)
            else:
                probs = torch.softmax(s / self.temperature, dim=-1)
                if self.top_p < 1.0:
                    sp, si = probs.sort(-1, descending=True)
                    drop = sp.cumsum(-1) - sp > self.top_p     # keep the smallest set >= top_p
                    sp[drop] = 0.0
                    probs = torch.zeros_like(probs).scatter(-1, si, sp)
                idx = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0]
                                   for i, g in enumerate(self.gens)])
            out = torch.full_like(scores, float("-inf"))
            out[torch.arange(len(idx), device=scores.device), idx] = 0.0
            return out

    return SeededSampler


class TransformersGenerator:
    """`transformers` text backend; the model is loaded on first use. Raises DeviceError for an
    unusable `runtime.device` at construction."""

    name = "transformers"

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = str(resolve_device(cfg.runtime.device))
        self._tok = self._lm = None
        self._format: str | None = None

    def _load(self):
        if self._lm is None:
            model, gguf = resolve_model(self.cfg.model, self.cfg.gguf_file)
            with _LOCK:
                self._tok, self._lm = load_model(model, gguf, self.cfg.revision, self.cfg.dtype,
                                                 self.device, self.cfg.trust_remote_code)
        return self._tok, self._lm

    @property
    def format(self) -> str:
        """The prompt format: as configured, or for `auto` from the tokenizer's chat template (loads the model)."""
        if self._format is None:
            self._format = prompt_format(self.cfg.format, lambda: self._load()[0])
        return self._format

    def describe(self) -> dict:
        """Model and sampling settings recorded per triplet."""
        c = self.cfg
        return {"model": c.model, "gguf_file": c.gguf_file, "revision": c.revision, "dtype": c.dtype,
                "temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens}

    def _texts(self, requests: list[Request]) -> tuple[list[str], bool]:
        tok, _ = self._load()
        if self.format == "chat":
            texts = [tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True,
                                             **self.cfg.chat_template_kwargs) for r in requests]
            return texts, False       # the template already holds the special tokens
        return [r.prompt for r in requests], True

    def generate(self, requests: list[Request]) -> list[Reply]:
        """One reply per request, in order, `runtime.batch_size` requests per `generate` call; a reply
        that hit `max_new_tokens` without an EOS or stop string has finish_reason "length"."""
        out: list[Reply] = []
        bs = self.cfg.runtime.batch_size
        for i in range(0, len(requests), bs):
            out += self._generate_batch(requests[i:i + bs])
        return out

    def _generate_batch(self, requests: list[Request]) -> list[Reply]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        if not requests:
            return []
        tok, lm = self._load()
        texts, special = self._texts(requests)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(self.device)
        eos = lm.generation_config.eos_token_id if lm.generation_config.eos_token_id is not None \
            else tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        stops = sorted({s for r in requests for s in r.stop})
        # A fresh config: the model's own sampling defaults must not change our outputs.
        gc = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                              num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos_ids),
                              repetition_penalty=self.cfg.repetition_penalty,
                              stop_strings=stops or None)
        sampler = _sampler_class()([r.seed for r in requests], self.cfg.temperature, self.cfg.top_p,
                                   str(lm.device))
        # On the CPU, a fixed thread count: a logit's last bits (and so a sampled token) must not
        # depend on the worker layout.
        with torch.inference_mode(), record_threads(lm.device):
            seqs = lm.generate(**enc, generation_config=gc, logits_processor=LogitsProcessorList([sampler]),
                               tokenizer=tok if stops else None)
        new = seqs[:, enc["input_ids"].shape[1]:].tolist()
        replies = []
        for r, ids in zip(requests, new):
            ended = next((k for k, t in enumerate(ids) if t in eos_ids), None)
            ids = ids if ended is None else ids[:ended]
            text = tok.decode(ids, skip_special_tokens=True)
            hit = [text.find(s) for s in r.stop if s in text]
            if hit:
                text = text[:min(hit)]
            done = ended is not None or bool(hit) or len(ids) < self.cfg.max_new_tokens
            replies.append(Reply(text=text, finish_reason="stop" if done else "length"))
        return replies
