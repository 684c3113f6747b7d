"""CLIP wrapper for CIR: image features (global + patch tokens) and a text encoder with hooks.

The text encoder re-runs open_clip's own steps (token embedding, positional embedding, the
resblocks with the causal mask, ln_final, EOT pooling, projection) so that three things can be
inserted without touching open_clip:

- pseudo-word tokens: the embedding of every `$` (CLIP BPE id 259) is replaced by the token
  learner's output (several consecutive `$` take several pseudo tokens, in order);
- VSI: after chosen blocks, gated cross-attention from the pseudo positions to the image's
  patch tokens (stage I);
- composing adapters: after chosen blocks (stage II).

With none of them, `encode_text` is open_clip's `encode_text` to the last bit (a test checks it).
Loading goes through `datagen.clip_loader.load_clip`, the project's one loader.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from datagen.clip_loader import LoadedClip, load_clip

PLACEHOLDER = "$"
PLACEHOLDER_ID = 259


def expand_placeholder(prompt: str, n_tokens: int) -> str:
    """`a photo of $ that ...` -> `a photo of $ $ $ that ...` for n_tokens pseudo-word tokens."""
    return prompt.replace(PLACEHOLDER, " ".join([PLACEHOLDER] * n_tokens)) if n_tokens > 1 else prompt


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
        if not hasattr(self.clip, "transformer") or not hasattr(self.clip, "token_embedding"):
            raise ValueError(f"{self.name}: only CLIP models with open_clip's built-in text tower are "
                             "supported (CustomTextCLIP / HF text towers are not)")

    @classmethod
    def load(cls, name: str = "shapes-clip", pretrained: str | None = None, device: str = "cpu",
             random_init: bool = False) -> "CIRClip":
        return cls(load_clip(name, pretrained, device, random_init=random_init))

    # ------------------------------------------------------------------ dims
    @property
    def text_width(self) -> int:
        return self.clip.token_embedding.weight.shape[1]

    @property
    def vision_width(self) -> int:
        """Width of the patch tokens that `image_features(patches=True)` returns."""
        v = self.clip.visual
        if hasattr(v, "attnpool"):                 # ModifiedResNet: channels of the last stage
            return v.attnpool.k_proj.in_features
        return v.conv1.out_channels if hasattr(v, "conv1") else v.output_dim

    @property
    def embed_dim(self) -> int:
        proj = self.clip.text_projection
        return proj.weight.shape[0] if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().detach()

    def freeze(self) -> "CIRClip":
        self.clip.requires_grad_(False)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ images
    def image_features(self, images: torch.Tensor, patches: bool = False):
        """Projected global embedding [B, D] (not normalised) and, on request, patch tokens
        [B, P, vision_width] (ViT: after ln_post, as open_clip returns them; ModifiedResNet: the
        last stage's feature map, one token per cell, the input of its attention pool)."""
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
        return pooled, tokens

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: list[str], require_placeholder: bool = False) -> torch.Tensor:
        tokens = self.tokenizer(prompts)
        if require_placeholder:
            has = (tokens == PLACEHOLDER_ID).any(dim=1)
            for i, p in enumerate(prompts):
                if PLACEHOLDER in p and not bool(has[i]):
                    raise ValueError(f"prompt {i} lost its `$` placeholder to truncation at "
                                     f"{self.context_length} tokens: {p[:80]!r}...")
        return tokens

    def encode_text(self, tokens: torch.Tensor, pseudo: torch.Tensor | None = None,
                    hooks: list[Callable] | None = None, normalize: bool = False,
                    truncate: bool = True) -> torch.Tensor:
        """open_clip's text forward with pseudo-token injection and per-block hooks.

        pseudo: [B, n, W] pseudo-word embeddings; the k-th `$` of a row takes pseudo[:, k % n].
        hooks: callables `hook(block_index, x, ctx) -> x` run after every block (VSI, adapters);
               ctx holds the placeholder mask.
        truncate: run only up to the longest prompt's EOT. Exact in arithmetic (causal mask), but
               matrix shapes change the float summation order, so features can differ from the
               full-length pass by ~1e-7 relative; `truncate=False` reproduces open_clip bitwise.
        """
        m = self.clip
        mask = m.attn_mask
        if truncate and mask is not None and m.text_pool_type == "argmax":
            # Causal attention: positions after the last EOT cannot change any pooled output, so
            # run only up to the longest prompt (a 6-token prompt costs 6/77 of a full pass).
            n = int(tokens.argmax(dim=-1).max()) + 1
            tokens, mask = tokens[:, :n], mask[:n, :n]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)
        is_ph = tokens == PLACEHOLDER_ID
        if pseudo is not None:
            x = inject_pseudo_tokens(x, is_ph, pseudo.to(cast_dtype))
        x = x + m.positional_embedding[:x.shape[1]].to(cast_dtype)
        ctx = {"placeholder_mask": is_ph}
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
    """Replace the embeddings at placeholder positions (differentiably)."""
    if pseudo.dim() == 2:
        pseudo = pseudo[:, None, :]
    n = pseudo.shape[1]
    k = (torch.cumsum(is_ph.long(), dim=1) - 1).clamp(min=0) % n          # [B, L]
    per_pos = torch.gather(pseudo, 1, k[..., None].expand(-1, -1, pseudo.shape[-1]))
    return torch.where(is_ph[..., None], per_pos, x)
