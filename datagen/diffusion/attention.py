"""Shared self-attention for paired generation (the InstructPix2Pix recipe) as a diffusers processor.

What is shared. The UNet batch of a paired call holds adjacent pairs (image 0 = source caption,
image 1 = edited caption) in every CFG branch: [uncond_0, uncond_1, ..., cond_0, cond_1, ...].
While pair j is active (denoising step i < p_j * T), in every self-attention layer (`attn1`):

* mode "attention" (IP2P): image 1 attends with image 0's queries and keys, i.e. it uses image 0's
  attention probabilities softmax(Q0 K0^T / sqrt(d)) applied to its *own* values V1. This equals
  IP2P's copy of the self-attention logits (softmax is row-wise), and is done with SDPA, so no N x N
  map is materialised.
* mode "kv" (StyleAligned/MasaCtrl family): image 1 keeps its queries and uses image 0's keys and values.

The copy is per CFG branch: uncond image 1 gets uncond image 0's map, cond image 1 gets cond image 0's
(IP2P copies sims[0] -> sims[1] and sims[2] -> sims[3] of its {cond, uncond} x {prompt0, prompt1}
batch). Image 0 is never changed, cross-attention (`attn2`) is never touched, and when no pair is
active the layer runs its original processor, so p = 0 is exactly the plain pipeline.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

MODES = ("attention", "kv")


class ShareState:
    """Which pairs share at the current step; one per generation call, read by every processor.

    `fractions`: p_j per pair, the fraction of the denoising steps with shared self-attention; `mode`:
    one of `MODES`. Raises ValueError for another mode."""

    def __init__(self, fractions: Sequence[float], mode: str = "attention"):
        if mode not in MODES:
            raise ValueError(f"share mode {mode!r} is not one of {MODES}")
        self.fractions = torch.tensor([float(p) for p in fractions], dtype=torch.float64)
        self.mode = mode
        self.active = self.fractions > 0          # step 0 shares iff 0 < p * T
        self._index: dict = {}

    def set_step(self, i: int, n_steps: int) -> None:
        """Make step `i` of `n_steps` current: pair j shares iff i < p_j * n_steps (clears the cached index)."""
        self.active = i < self.fractions * n_steps
        self._index.clear()

    def shared_steps(self, n_steps: int) -> list[int]:
        """How many of `n_steps` steps each pair shares: #{i : i < p * T}."""
        return [min(n_steps, math.ceil(p * n_steps)) for p in self.fractions.tolist()]

    def callback(self, pipe, i: int, t, kwargs: dict) -> dict:
        """`callback_on_step_end`: after step i, decide sharing for step i + 1 (must return kwargs)."""
        self.set_step(i + 1, pipe.num_timesteps)
        return kwargs

    def gather_index(self, batch: int, device) -> torch.Tensor | None:
        """Batch index that maps image 1 of every active pair onto image 0; None if nothing shares.

        `batch`: the UNet batch (2 images x n pairs x CFG branches). Returns a [batch] int64 index on
        `device` (cached per step). Raises RuntimeError when `batch` is not a multiple of 2 x n pairs."""
        if not bool(self.active.any()):
            return None
        key = (batch, str(device))
        if key not in self._index:
            n = len(self.active)
            if batch % (2 * n):
                raise RuntimeError(f"shared attention: UNet batch {batch} is not a multiple of 2 x {n} pairs")
            src = torch.arange(batch).view(-1, 2)
            act = self.active.repeat(batch // (2 * n))     # one copy per CFG branch
            src[act, 1] = src[act, 0]
            self._index[key] = src.flatten().to(device)
        return self._index[key]


class SharedSelfAttnProcessor:
    """AttnProcessor2_0 arithmetic with image 1 of active pairs reading image 0's q/k (or k/v)."""

    def __init__(self, state: ShareState, fallback):
        self.state = state
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        idx = None if encoder_hidden_states is not None else \
            self.state.gather_index(hidden_states.shape[0], hidden_states.device)
        if idx is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            attention_mask = attention_mask.index_select(0, idx)   # image 1 uses image 0's logits, mask included
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if self.state.mode == "attention":
            q, k = q.index_select(0, idx), k.index_select(0, idx)
        else:
            k, v = k.index_select(0, idx), v.index_select(0, idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def shared_self_attention(unet, state: ShareState) -> Iterator[int]:
    """Install the sharing processor on every self-attention layer for the duration of a call;
    the previous processors are restored afterwards. Yields the number of layers patched.
    Raises ValueError when the UNet has no `attn1` layer (not a UNet2DConditionModel pipeline)."""
    old = dict(unet.attn_processors)
    names = [n for n in old if n.endswith("attn1.processor")]
    if not names:
        raise ValueError("no self-attention (attn1) layers found: diffusers-paired needs a "
                         "UNet2DConditionModel pipeline (SD 1.x/2.x, SDXL, SDXL-Turbo)")
    unet.set_attn_processor({n: SharedSelfAttnProcessor(state, p) if n in names else p for n, p in old.items()})
    try:
        yield len(names)
    finally:
        unet.set_attn_processor(old)
