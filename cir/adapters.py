"""Stage II modules: composing adapters (default), LoRA on attention, or full text fine-tuning.

All three start as an identity on the text encoder (adapter up-projections and LoRA B matrices
are zero-initialised), so stage II begins exactly where stage I ended.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass
class ComposeConfig:
    mode: str = "adapter"             # adapter | lora | full
    layers: list[int] = field(default_factory=lambda: [-1])   # -1 = every text block
    bottleneck: int = 64              # adapter hidden width
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def validate(self) -> None:
        if self.mode not in ("adapter", "lora", "full"):
            raise ValueError(f"mode: {self.mode!r} is not one of adapter, lora, full")


class BottleneckAdapter(nn.Module):
    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(self.ln(x))))


class LoRADelta(nn.Module):
    """Parametrisation W -> W + (alpha/r) B A with B = 0 at init."""

    def __init__(self, out_f: int, in_f: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_f) / rank)
        self.B = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.B @ self.A).to(w.dtype)


def _chosen(layers: list[int], n: int) -> list[int]:
    return list(range(n)) if -1 in layers else sorted({(l + n) % n for l in layers})


class Composer(nn.Module):
    """What stage II trains on the text encoder, in one of three modes."""

    def __init__(self, clip_model: nn.Module, cfg: ComposeConfig):
        super().__init__()
        self.cfg = cfg
        blocks = clip_model.transformer.resblocks
        width = clip_model.token_embedding.weight.shape[1]
        device = clip_model.token_embedding.weight.device     # build beside the tower (GPU users)
        self.layers = _chosen(cfg.layers, len(blocks))
        self.adapters = nn.ModuleDict()
        self.lora = nn.ModuleList()
        if cfg.mode == "adapter":
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
        a = self.adapters[str(i)] if str(i) in self.adapters else None
        return x if a is None else a(x)

    def trainable_parameters(self):
        if self.cfg.mode == "full":
            return list(self.text_params)
        return [p for p in self.parameters()]
