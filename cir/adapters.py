"""Stage II modules: what teaches the text encoder to compose the pseudo-word with the text.

- `low-rank` (default; TSCIR's composing adapters, `model/model.py`: `LoRALayer`, applied in
  `encode_text_img_retrieval`): after each chosen block (`every-other`: 1, 3, ..., 11 of 12) the
  whole hidden sequence goes through h <- h + h A B, A [W, r], B [r, W], r = 128, both drawn
  N(0, 1) x 0.01, so stage II does not start exactly at stage I (the product is ~1e-4 x h).
  Where a block has both, VSI runs first, then the adapter (the released order).
- `bottleneck` (cirgen's first design): LN -> down -> GELU -> up, up zero-initialised.
- `lora`: LoRA on the attention projections of the chosen blocks (B zero-initialised).
- `full`: the whole text tower is trained.
`bottleneck`, `lora` and `full` start as an identity on the text encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from datagen.base.config import at_least

from .blocks import check_block_spec, resolve_blocks


@dataclass
class ComposeConfig:
    """Stage II's composer: which module (`mode`) on which text blocks; the stage II recipe's
    `compose` section, stored in a run's `model.json` and built by `Composer`."""

    mode: str = "low-rank"            # low-rank (TSCIR) | bottleneck | lora | full
    layers: list[int] | str = "every-other"    # see cir/blocks.py
    rank: int = at_least(1, 128)      # low-rank adapter rank (released: 128)
    init_std: float = at_least(0.0, 0.01)   # low-rank: A, B ~ N(0, 1) x init_std (released: 0.01)
    bottleneck: int = at_least(1, 64)  # bottleneck adapter hidden width
    lora_rank: int = at_least(1, 8)
    lora_alpha: float = 16.0

    def validate(self) -> None:
        """Check `mode` and the `layers` spec (`check_block_spec`); ValueError otherwise (the sizes'
        lower bounds are `at_least` on the fields)."""
        if self.mode not in ("low-rank", "bottleneck", "lora", "full"):
            raise ValueError(f"mode: {self.mode!r} is not one of low-rank, bottleneck, lora, full")
        check_block_spec(self.layers, "layers")


class LowRankAdapter(nn.Module):
    """h -> h + h A B on every position: [B, L, W] -> [B, L, W] (TSCIR `LoRALayer`)."""

    def __init__(self, width: int, rank: int, init_std: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(width, rank) * init_std)
        self.B = nn.Parameter(torch.randn(rank, width) * init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, W] hidden states -> x + x A B, [B, L, W] (A, B cast to x's dtype)."""
        return x + (x @ self.A.to(x.dtype)) @ self.B.to(x.dtype)


class BottleneckAdapter(nn.Module):
    """cirgen's first design: h -> h + up(GELU(down(LN(h)))) on every position, [B, L, W] ->
    [B, L, W], hidden width `bottleneck`; `up` is zero-initialised, so it starts as the identity."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, W] -> [B, L, W]."""
        return x + self.up(self.act(self.down(self.ln(x))))


class LoRADelta(nn.Module):
    """Parametrisation W -> W + (alpha/r) B A with B = 0 at init (LoRA, Hu et al., 2021, section 4.1).

    W: [out_f, in_f]; A: [r, in_f] drawn N(0, 1) / r; B: [out_f, r] zeros, so training starts
    from the frozen weight."""

    def __init__(self, out_f: int, in_f: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_f) / rank)
        self.B = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """w: the frozen weight [out_f, in_f] -> w + (alpha/r) B A, same shape and dtype."""
        return w + self.scale * (self.B @ self.A).to(w.dtype)


class Composer(nn.Module):
    """What stage II trains on the text encoder, in one of four modes (see the module docstring)."""

    def __init__(self, clip_model: nn.Module, cfg: ComposeConfig):
        super().__init__()
        self.cfg = cfg
        blocks = clip_model.transformer.resblocks
        width = clip_model.token_embedding.weight.shape[1]
        device = clip_model.token_embedding.weight.device     # build beside the tower (GPU users)
        self.layers = resolve_blocks(cfg.layers, len(blocks))
        self.adapters = nn.ModuleDict()
        self.lora = nn.ModuleList()
        if cfg.mode == "low-rank":
            self.adapters.update({str(l): LowRankAdapter(width, cfg.rank, cfg.init_std).to(device)
                                  for l in self.layers})
        elif cfg.mode == "bottleneck":
            self.adapters.update({str(l): BottleneckAdapter(width, cfg.bottleneck).to(device)
                                  for l in self.layers})
        elif cfg.mode == "lora":
            for l in self.layers:
                attn = blocks[l].attn
                d_in = LoRADelta(attn.in_proj_weight.shape[0], attn.in_proj_weight.shape[1], cfg.lora_rank,
                                 cfg.lora_alpha).to(device)
                d_out = LoRADelta(attn.out_proj.weight.shape[0], attn.out_proj.weight.shape[1], cfg.lora_rank,
                                  cfg.lora_alpha).to(device)
                parametrize.register_parametrization(attn, "in_proj_weight", d_in)
                parametrize.register_parametrization(attn.out_proj, "weight", d_out)
                self.lora.extend([d_in, d_out])
        else:  # full fine-tuning of the text tower
            self.text_params = [p for n, p in clip_model.named_parameters() if not n.startswith("visual.")
                                and n != "logit_scale" and "logit_bias" not in n]

    def hook(self, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Block hook for `CIRClip.encode_text`: after block i, x [B, L, W] goes through block i's
        adapter (`low-rank`, `bottleneck`) or is returned unchanged (other blocks; `lora` acts
        through the parametrised weights, `full` through the tower itself). `ctx` is unused."""
        a = self.adapters[str(i)] if str(i) in self.adapters else None
        return x if a is None else a(x)
