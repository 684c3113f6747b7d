"""CLIP wrapper for CIR: image features (global + visual tokens) and a text encoder with hooks.

The text encoder re-runs open_clip's own steps (token embedding, positional embedding, the
resblocks with the causal mask, ln_final, EOT pooling, projection) so that three things can be
inserted without touching open_clip:

- pseudo-word tokens: at the placeholder position of the query template (see `cir.prompts`),
  the token embedding is replaced by the token learner's output (n consecutive positions for
  n pseudo tokens);
- Visual Semantic Injection: hooks after chosen blocks that add to the pseudo-token state (stage I);
- composing adapters: hooks after chosen blocks on the whole sequence (stage II).

With none of them, `encode_text` is open_clip's `encode_text` to the last bit (a test checks it).
Loading goes through `datagen.base.clip_loader.load_clip`, the project's one loader.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from datagen.base.clip_loader import LoadedClip, load_clip

from .prompts import PromptError, QueryPrompt, as_query_prompts


def expand_placeholder(prompt: QueryPrompt | str, n_tokens: int) -> str:
    """How a prompt reads with n pseudo-word tokens, for logs: `a photo of * * * that ...`."""
    return as_query_prompts([prompt])[0].text(n_tokens=n_tokens)


class CIRClip(nn.Module):
    """A frozen-by-default open_clip model with the CIR text-encoder hooks."""

    def __init__(self, loaded: LoadedClip):
        super().__init__()
        self.clip = loaded.model
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.weights_id = loaded.weights_id
        self.grad_checkpointing = False
        self._bpe_cache: dict[str, list[int]] = {}
        if not hasattr(self.clip, "transformer") or not hasattr(self.clip, "token_embedding"):
            raise ValueError(f"{self.name}: only CLIP models with open_clip's built-in text tower are "
                             "supported (CustomTextCLIP / HF text towers are not)")

    @classmethod
    def load(cls, name: str = "shapes-clip", pretrained: str | None = None, device: str = "cpu",
             random_init: bool = False) -> "CIRClip":
        """Load CLIP `name` with `datagen.base.clip_loader.load_clip` (`pretrained`: a local file or
        an open_clip tag, None = the default; `random_init`: seeded random weights) onto `device`.
        Errors: InputNotFound for a weights path that does not exist; ValueError for a model
        without open_clip's built-in text tower."""
        return cls(load_clip(name, pretrained, device, random_init=random_init))

    # ------------------------------------------------------------------ dims
    @property
    def text_width(self) -> int:
        """Width W of the text tower (token embeddings and hidden states)."""
        return self.clip.token_embedding.weight.shape[1]

    @property
    def vision_width(self) -> int:
        """Width of the visual tokens that `image_features(patches=True)` returns."""
        v = self.clip.visual
        if hasattr(v, "attnpool"):                 # ModifiedResNet: channels of the last stage
            return v.attnpool.k_proj.in_features
        if getattr(v, "proj", None) is not None:   # ViT: tokens after ln_post and the projection
            return v.proj.shape[1]
        return v.conv1.out_channels if hasattr(v, "conv1") else v.output_dim

    @property
    def patch_tokens_spec(self) -> str:
        """What the visual tokens are (part of the feature cache key)."""
        return "resnet-last-stage" if hasattr(self.clip.visual, "attnpool") else "vit-ln_post-proj"

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space (the text projection's output)."""
        proj = self.clip.text_projection
        return proj.weight.shape[0] if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        """Text context length in tokens, SOT and EOT included."""
        return self.clip.context_length

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's learnt logit scale exp(t) = 1/T, a detached 0-d tensor (cosines are multiplied by it)."""
        return self.clip.logit_scale.exp().detach()

    def freeze(self) -> "CIRClip":
        """Stop gradients to every CLIP weight and put CLIP in eval mode; returns self."""
        self.clip.requires_grad_(False)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ images
    def image_features(self, images: torch.Tensor, patches: bool = False):
        """Projected global embedding [B, D] (not normalised) and, on request, visual tokens
        [B, P, vision_width], CLS excluded, in row-major grid order.

        images: [B, 3, H, W] preprocessed pixels. Returns the [B, D] tensor alone when `patches`
        is False, else the pair.

        ViT: every patch token after ln_post and the visual projection (TSCIR's `get_tokens`,
        `model/model.py`: for ViT-L/14 at 224 px, P = 256 tokens of 768). ModifiedResNet (shapes-CLIP,
        which has no per-token projection): the last stage's feature map, one token per cell, the
        input of its attention pool (P = 4 cells of 1024 for shapes-CLIP)."""
        v = self.clip.visual
        if not patches:
            return self.clip.encode_image(images)
        if hasattr(v, "attnpool"):
            x = v.stem(images.to(v.conv1.weight.dtype))
            x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
            return v.attnpool(x), x.flatten(2).transpose(1, 2)
        prev = getattr(v, "output_tokens", False)
        v.output_tokens = True
        try:
            pooled, tokens = v(images)
        finally:
            v.output_tokens = prev
        if getattr(v, "proj", None) is not None and tokens.shape[-1] != v.proj.shape[1]:
            tokens = tokens @ v.proj
        return pooled, tokens

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Plain text -> [B, context_length] token ids (open_clip's tokenizer, truncated)."""
        return self.tokenizer(texts)

    def tokenize_queries(self, prompts: Sequence[QueryPrompt | str], n_tokens: int = 1,
                         where: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Composed-query prompts -> (tokens [B, L] int64, placeholder index [B] int64).

        Row = [SOT] + bpe(prefix) + n_tokens x [placeholder id] + bpe(suffix) + [EOT], cut to the
        context length with EOT kept last (open_clip's truncation). The placeholder is a template
        position: a `*`/`$` in the caption or modification text stays text.
        Errors: `PromptError` naming `where[i]` (or the prompt's index) when the prefix pushes the
        placeholder out of the context.
        """
        tok = self.tokenizer
        if not hasattr(tok, "encode") or not hasattr(tok, "sot_token_id"):
            raise PromptError(f"{self.name}: pseudo-word prompts need open_clip's BPE tokenizer "
                              f"(this model uses {type(tok).__name__})")
        ctx_len = self.context_length
        bpe = self._bpe
        ph_id = bpe("*")[0]
        qps = as_query_prompts(prompts)
        out = torch.zeros(len(qps), ctx_len, dtype=torch.long)
        ph_index = torch.empty(len(qps), dtype=torch.long)
        for i, q in enumerate(qps):
            pre, post = bpe(q.prefix), bpe(q.suffix)
            if 1 + len(pre) + n_tokens > ctx_len - 1:
                name = where[i] if where is not None else f"prompt {i}"
                raise PromptError(f"{name}: the placeholder falls outside the {ctx_len}-token text context "
                                  f"({len(pre)} tokens before it): {q.text()[:80]!r}")
            ids = [tok.sot_token_id] + pre + [ph_id] * n_tokens + post
            ids = ids[:ctx_len - 1] + [tok.eot_token_id]
            out[i, :len(ids)] = torch.tensor(ids)
            ph_index[i] = 1 + len(pre)
        return out, ph_index

    def placeholder_fits(self, prompts: Sequence[QueryPrompt | str], n_tokens: int = 1) -> list[bool]:
        """Per prompt: does the placeholder fall inside the text context? (Integrity checks.)"""
        return [1 + len(self._bpe(q.prefix)) + n_tokens <= self.context_length - 1 for q in as_query_prompts(prompts)]

    def _bpe(self, text: str) -> list[int]:
        """BPE ids of `text` (no SOT/EOT), memoised: training re-encodes the same prompt pieces
        every epoch and the tokenizer is pure Python."""
        ids = self._bpe_cache.get(text)
        if ids is None:
            if len(self._bpe_cache) > 200_000:
                self._bpe_cache.clear()
            ids = self._bpe_cache[text] = self.tokenizer.encode(text)
        return ids

    def encode_text(self, tokens: torch.Tensor, pseudo: torch.Tensor | None = None,
                    placeholder_index: torch.Tensor | None = None, hooks: list[Callable] | None = None,
                    normalize: bool = False, truncate: bool = True) -> torch.Tensor:
        """open_clip's text forward with pseudo-token injection and per-block hooks -> [B, D].

        tokens: [B, L] ids (`tokenize` or `tokenize_queries`), on any device: they are moved to the
               text tower's (pass them on the CPU, as tokenized, to spare a GPU sync).
        pseudo: [B, n, W] (or [B, W]) pseudo-word embeddings, written at positions
               placeholder_index .. placeholder_index + n - 1 of each row (both or neither).
        hooks: callables `hook(block_index, x, ctx) -> x` run after every block (VSI, adapters);
               x is [B, L, W]; ctx holds `placeholder_mask` [B, L] bool, `placeholder_index` [B]
               and `eot_index` [B] (the EOT position, where the sentence feature is pooled), all on
               the tower's device, and `n_pseudo` (pseudo tokens per row, a Python int).
        truncate: run only up to the longest prompt's EOT. Exact in arithmetic (causal mask), but
               matrix shapes change the float summation order, so features can differ from the
               full-length pass by ~1e-7 relative; `truncate=False` reproduces open_clip bitwise.
        D is `embed_dim`; L2-normalised when `normalize`.
        Errors: ValueError when `pseudo` comes without `placeholder_index`.
        """
        m = self.clip
        mask = m.attn_mask
        eot_index = tokens.argmax(dim=-1)             # EOT has the largest id in CLIP's vocabulary
        if truncate and mask is not None and m.text_pool_type == "argmax":
            # Causal attention: positions after the last EOT cannot change any pooled output, so
            # run only up to the longest prompt (a 6-token prompt costs 6/77 of a full pass).
            # Read on the tokens' device (the CPU, as tokenized): no GPU sync for this length.
            n = int(eot_index.max()) + 1
            tokens, mask = tokens[:, :n], mask[:n, :n]
        dev = m.token_embedding.weight.device         # tokens may come from the CPU tokenizer
        tokens, eot_index = tokens.to(dev), eot_index.to(dev)
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)
        is_ph = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        n_pseudo = 0
        if pseudo is not None:
            if placeholder_index is None:
                raise ValueError("pseudo-word tokens need their placeholder_index")
            pseudo = pseudo if pseudo.dim() == 3 else pseudo[:, None, :]
            pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
            placeholder_index = placeholder_index.to(tokens.device)
            start = placeholder_index[:, None]
            n_pseudo = pseudo.shape[1]
            is_ph = (pos >= start) & (pos < start + n_pseudo)
            x = inject_pseudo_tokens(x, is_ph, pseudo.to(cast_dtype))
        x = x + m.positional_embedding[:x.shape[1]].to(cast_dtype)
        ctx = {"placeholder_mask": is_ph, "placeholder_index": placeholder_index, "eot_index": eot_index,
               "n_pseudo": n_pseudo}
        for i, blk in enumerate(m.transformer.resblocks):
            if self.grad_checkpointing and self.training and x.requires_grad:
                x = checkpoint(blk, x, None, None, mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=mask)
            for hook in hooks or ():
                x = hook(i, x, ctx)
        x = m.ln_final(x)
        from open_clip.transformer import text_global_pool

        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def inject_pseudo_tokens(x: torch.Tensor, is_ph: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """Write pseudo[:, k] at the k-th placeholder position of each row (differentiably).

    x: [B, L, W] token embeddings; is_ph: [B, L] bool with n consecutive True per row;
    pseudo: [B, n, W]. Returns [B, L, W].
    """
    k = (torch.cumsum(is_ph.long(), dim=1) - 1).clamp(min=0, max=pseudo.shape[1] - 1)   # [B, L]
    per_pos = torch.gather(pseudo, 1, k[..., None].expand(-1, -1, pseudo.shape[-1]))
    return torch.where(is_ph[..., None], per_pos, x)
