"""Stage I modules: the token learner (image -> pseudo-word tokens) and Visual Semantic Injection.

Paper: "we enhance image-to-pseudo-word token learning by introducing a visual semantic injection
module ... integrated into various layers of the text encoder to continuously inject visual
semantics". Only the abstract and captions are public, so the concrete forms below are cirgen's
documented defaults (see MappingConfig).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MappingConfig:
    n_tokens: int = 1                 # pseudo-word tokens per image (design default: 1)
    hidden_mult: int = 4              # token learner: d -> 4d -> 4d -> n*d_text
    dropout: float = 0.1
    activation: str = "gelu"          # "relu" for the Pic2Word-style baseline
    vsi: bool = True
    vsi_layers: list[int] = field(default_factory=lambda: [-1])   # -1 = every text block
    vsi_heads: int = 4

    def validate(self) -> None:
        if self.n_tokens < 1:
            raise ValueError("n_tokens must be >= 1")
        if self.activation not in ("gelu", "relu"):
            raise ValueError("activation must be gelu or relu")


class TokenLearner(nn.Module):
    """MLP on the global image embedding -> n pseudo-word embeddings in the token space."""

    def __init__(self, embed_dim: int, text_width: int, cfg: MappingConfig):
        super().__init__()
        h = cfg.hidden_mult * embed_dim
        act = nn.GELU if cfg.activation == "gelu" else nn.ReLU
        self.n_tokens, self.text_width = cfg.n_tokens, text_width
        self.net = nn.Sequential(
            nn.Linear(embed_dim, h), act(), nn.Dropout(cfg.dropout),
            nn.Linear(h, h), act(), nn.Dropout(cfg.dropout),
            nn.Linear(h, cfg.n_tokens * text_width),
        )

    def forward(self, image_embed: torch.Tensor) -> torch.Tensor:
        return self.net(image_embed).view(-1, self.n_tokens, self.text_width)


class VSILayer(nn.Module):
    """h <- h + tanh(g) * XAttn(LN(h), P) at the pseudo-token positions; g starts at 0."""

    def __init__(self, text_width: int, heads: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(text_width)
        self.ln_kv = nn.LayerNorm(text_width)
        self.attn = nn.MultiheadAttention(text_width, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, patches: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(patches)
        out = self.attn(self.ln_q(x), kv, kv, need_weights=False)[0]
        return x + torch.tanh(self.gate) * out * where[..., None].to(out.dtype)


class VSI(nn.Module):
    """Patch tokens projected once to the text width, then injected after the chosen blocks."""

    def __init__(self, vision_width: int, text_width: int, n_blocks: int, cfg: MappingConfig):
        super().__init__()
        layers = sorted({(l + n_blocks) % n_blocks for l in cfg.vsi_layers}) if -1 not in cfg.vsi_layers \
            else list(range(n_blocks))
        self.layers = layers
        self.proj = nn.Linear(vision_width, text_width)
        self.blocks = nn.ModuleDict({str(l): VSILayer(text_width, cfg.vsi_heads) for l in layers})

    def hook(self, patches: torch.Tensor):
        projected = self.proj(patches)

        def run(i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
            blk = self.blocks[str(i)] if str(i) in self.blocks else None
            return x if blk is None else blk(x, projected, ctx["placeholder_mask"])
        return run


class Mapping(nn.Module):
    """Token learner + optional VSI: everything stage I trains."""

    def __init__(self, embed_dim: int, text_width: int, vision_width: int, n_blocks: int, cfg: MappingConfig):
        super().__init__()
        self.cfg = cfg
        self.token_learner = TokenLearner(embed_dim, text_width, cfg)
        self.vsi = VSI(vision_width, text_width, n_blocks, cfg) if cfg.vsi else None
