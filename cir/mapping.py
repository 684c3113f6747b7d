"""Stage I modules: the token learner (image -> pseudo-word token) and Visual Semantic Injection.

Defaults follow the authors' released code (LiJiaBei-7/TSCIR, `model/model.py`: `IM2TEXT`,
`Adapter`, `MLP`; `model/module.py`: `CrossAttention`); see `docs` of each class. cirgen's first
designs stay as options: the wider GELU token learner (`token_hidden: null, activation: gelu`) and
the gated cross-attention VSI in every block (`vsi: gated, vsi_layers: all`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import check_block_spec, resolve_blocks


@dataclass
class MappingConfig:
    """Stage I's mapping: the token learner and Visual Semantic Injection; the stage I recipe's
    `mapping` section, stored in a run's `model.json` and built by `Mapping`."""

    n_tokens: int = 1                 # pseudo-word tokens per image (TSCIR: 1)
    token_hidden: int | None = 512    # token learner hidden width (Pic2Word/TSCIR: 512); null = 4 x embed dim
    activation: str = "relu"          # token learner activation: relu (Pic2Word/TSCIR) | gelu
    dropout: float = 0.1
    vsi: str | bool = "tscir"         # tscir (released injector) | gated (cirgen's first design) | off (false)
    vsi_layers: list[int] | str = "tscir-vsi"   # see cir/blocks.py
    vsi_width: int = 128              # tscir: inner width of the injector (released: 128)
    vsi_heads: int = 8                # attention heads (tscir: 8 at width 128; gated: at the text width)
    vsi_attn_layers: int = 2          # tscir: stacked cross-attention layers
    vsi_final_relu: bool = True       # tscir: the released injector ends in ReLU (output >= 0); false = linear

    def __post_init__(self) -> None:
        if isinstance(self.vsi, bool):            # `vsi: false` reads naturally in YAML
            self.vsi = "tscir" if self.vsi else "off"

    def validate(self) -> None:
        """Check `n_tokens >= 1`, `activation`, `vsi`, `token_hidden >= 1` (or null), the
        `vsi_layers` spec and, for `vsi: tscir`, that `vsi_heads` divides `vsi_width`; ValueError
        otherwise."""
        if self.n_tokens < 1:
            raise ValueError("n_tokens must be >= 1")
        if self.activation not in ("gelu", "relu"):
            raise ValueError("activation must be gelu or relu")
        if self.vsi not in ("tscir", "gated", "off"):
            raise ValueError(f"vsi: {self.vsi!r} is not one of tscir, gated, off")
        if self.token_hidden is not None and self.token_hidden < 1:
            raise ValueError("token_hidden must be >= 1 (or null)")
        check_block_spec(self.vsi_layers, "vsi_layers")
        if self.vsi == "tscir" and self.vsi_width % self.vsi_heads:
            raise ValueError(f"vsi_width {self.vsi_width} is not divisible by vsi_heads {self.vsi_heads}")


def _act(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.GELU()


class MLP(nn.Sequential):
    """`layers` blocks of Linear -> Dropout -> activation (TSCIR's `MLP`, `model/model.py`):
    [..., d_in] -> [..., d_out]. Ends in the activation, so with ReLU the output is >= 0."""

    def __init__(self, d_in: int, d_out: int, layers: int = 2, dropout: float = 0.1, activation: str = "relu"):
        blocks = []
        for i in range(layers):
            blocks += [nn.Linear(d_in if i == 0 else d_out, d_out), nn.Dropout(dropout), _act(activation)]
        super().__init__(*blocks)


class TokenLearner(nn.Module):
    """Image embedding [B, D] -> n pseudo-word embeddings [B, n, W] in the token-embedding space.

    Pic2Word's IM2TEXT as TSCIR uses it: MLP(D -> h -> h) then Linear(h -> n*W), h = 512
    (`model/model.py`: `IM2TEXT.layers`, `fc_out`). `token_hidden: null` gives cirgen's first
    design's width 4D."""

    def __init__(self, embed_dim: int, text_width: int, cfg: MappingConfig):
        super().__init__()
        h = cfg.token_hidden or 4 * embed_dim
        self.n_tokens, self.text_width = cfg.n_tokens, text_width
        self.mlp = MLP(embed_dim, h, 2, cfg.dropout, cfg.activation)
        self.out = nn.Linear(h, cfg.n_tokens * text_width)

    def forward(self, image_embed: torch.Tensor) -> torch.Tensor:
        """image_embed: [B, D] CLIP image embeddings -> [B, n_tokens, W] pseudo-word embeddings."""
        return self.out(self.mlp(image_embed)).view(-1, self.n_tokens, self.text_width)


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention (TSCIR `model/module.py`: `CrossAttentionLayer`), sequence-first:

        a = MHA(q + q_pos, kv, kv);  out = LayerNorm(q + Dropout(Linear(Dropout(GELU(Linear(a))))))

    q, q_pos: [Lq, B, d]; kv: [Lk, B, d] -> [Lq, B, d]. As released there is no residual around
    the attention itself: the feed-forward of the attention output is what is added to q."""

    def __init__(self, d: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout)
        self.linear1 = nn.Linear(d, d)
        self.linear2 = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.dropout_out = nn.Dropout(dropout)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(d)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor | None = None) -> torch.Tensor:
        """q: [Lq, B, d]; kv: [Lk, B, d]; q_pos: [Lq, B, d] (or broadcastable) or None -> [Lq, B, d]."""
        a = self.attn(q if q_pos is None else q + q_pos, kv, kv, need_weights=False)[0]
        return self.norm(q + self.dropout_out(self.linear2(self.dropout(self.act(self.linear1(a))))))


class TSCIRInjector(nn.Module):
    """One Visual Semantic Injection step (TSCIR `model/model.py`: `Adapter`), after one text block.

    Inputs: h_ph [B, W] (pseudo-token state), h_eot [B, W] (EOT state), visual tokens V [B, P, W]
    (already mapped to the text width) with P = H x W' a grid. Steps:
      1. V as an H x W' map -> Conv3x3 (no bias) -> BatchNorm -> ReLU -> [P, B, W];
      2. three MLPs (2 x Linear-Dropout-ReLU) take h_ph, V, h_eot to d (128);
      3. `vsi_attn_layers` cross-attention layers: query h_ph, query position h_eot, keys V;
      4. an MLP d -> W -> W (ends in ReLU when `vsi_final_relu`, as released);
    returns the vector [B, W] to add at the pseudo-token position."""

    def __init__(self, text_width: int, cfg: MappingConfig):
        super().__init__()
        w, d = text_width, cfg.vsi_width
        self.conv = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.pseudo_in = MLP(w, d, 2, cfg.dropout)
        self.visual_in = MLP(w, d, 2, cfg.dropout)
        self.eot_in = MLP(w, d, 2, cfg.dropout)
        self.layers = nn.ModuleList(CrossAttentionLayer(d, cfg.vsi_heads, cfg.dropout)
                                    for _ in range(cfg.vsi_attn_layers))
        self.out = MLP(d, w, 2, cfg.dropout) if cfg.vsi_final_relu else nn.Sequential(
            *MLP(d, w, 1, cfg.dropout), nn.Linear(w, w), nn.Dropout(cfg.dropout))

    def forward(self, h_ph: torch.Tensor, h_eot: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """h_ph, h_eot: [B, W]; visual: [B, P, W] -> the vector to add, [B, W].

        The grid is H = floor(sqrt(P)) rows of P / H tokens (16 x 16 for ViT-L/14 at 224 px).
        Errors: ValueError when P is not H x (P // H), e.g. visual tokens that include CLS."""
        b, p, w = visual.shape
        gh = int(p ** 0.5)
        if gh * (p // gh) != p:
            raise ValueError(f"VSI needs the visual tokens of a grid; {p} tokens are not H x W")
        grid = visual.transpose(1, 2).reshape(b, w, gh, p // gh)
        v = self.visual_in(self.conv(grid).flatten(2).permute(2, 0, 1))        # [P, B, d]
        q = self.pseudo_in(h_ph)[None]                                           # [1, B, d]
        pos = self.eot_in(h_eot)[None]
        for layer in self.layers:
            q = layer(q, v, pos)
        return self.out(q[0])                                                    # [B, W]


class GatedInjector(nn.Module):
    """cirgen's first VSI design: h <- h + tanh(g) * XAttn(LN(h), LN(V)) at the pseudo-token
    positions, g = 0 at init (so training starts from the plain mapping). Returns the new x.
    Every block listed in `vsi_layers` gets one (recipe: `vsi: gated, vsi_layers: all`)."""

    def __init__(self, text_width: int, heads: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(text_width)
        self.ln_kv = nn.LayerNorm(text_width)
        self.attn = nn.MultiheadAttention(text_width, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, is_ph: torch.Tensor) -> torch.Tensor:
        """x: [B, L, W] hidden states; visual: [B, P, W] visual tokens at the text width; is_ph:
        [B, L] bool pseudo-token positions -> [B, L, W]; only the is_ph positions change."""
        kv = self.ln_kv(visual)
        out = self.attn(self.ln_q(x), kv, kv, need_weights=False)[0]
        return x + torch.tanh(self.gate) * out * is_ph[..., None].to(out.dtype)


class VSI(nn.Module):
    """Visual tokens mapped once to the text width (one Linear, TSCIR `IM2TEXT.fc_out_hidden`),
    then an injector after each chosen block. `hook(visual)` gives the text encoder's block hook.

    TSCIR (`vsi: tscir`): after block j, x[b, ph_b] += Injector_j(x[b, ph_b], x[b, eot_b], V_b):
    only the pseudo-token position changes, and only after the chosen blocks (unit-tested).
    With n_tokens > 1 every pseudo position gets its own query through the same injector."""

    def __init__(self, vision_width: int, text_width: int, n_blocks: int, cfg: MappingConfig):
        super().__init__()
        self.kind = cfg.vsi
        self.layers = resolve_blocks(cfg.vsi_layers, n_blocks)
        self.proj = nn.Linear(vision_width, text_width)
        if cfg.vsi == "tscir":
            self.blocks = nn.ModuleDict({str(j): TSCIRInjector(text_width, cfg) for j in self.layers})
        else:
            self.blocks = nn.ModuleDict({str(j): GatedInjector(text_width, cfg.vsi_heads) for j in self.layers})

    def hook(self, visual: torch.Tensor):
        """visual: [B, P, vision_width] reference visual tokens (projected to the text width once,
        here) -> hook(i, x [B, L, W], ctx) -> x [B, L, W] for `CIRClip.encode_text`.

        Blocks without an injector return x unchanged. `tscir` reads ctx `placeholder_index`,
        `eot_index` and `n_pseudo`; `gated` reads `placeholder_mask`."""
        projected = self.proj(visual.to(self.proj.weight.dtype))

        def run(i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
            blk = self.blocks[str(i)] if str(i) in self.blocks else None
            if blk is None:
                return x
            if self.kind == "gated":
                return blk(x, projected, ctx["placeholder_mask"])
            rows = torch.arange(x.shape[0], device=x.device)
            h_eot = x[rows, ctx["eot_index"]]
            mask = ctx["placeholder_mask"]
            # Each pseudo position (1 by default); a Python int from the caller, not a device read.
            n = ctx["n_pseudo"] if "n_pseudo" in ctx else int(mask.sum(1).max())
            for k in range(n):
                col = ctx["placeholder_index"] + k
                add = blk(x[rows, col], h_eot, projected).to(x.dtype)
                x = x.index_put((rows, col), x[rows, col] + add)
            return x
        return run


class Mapping(nn.Module):
    """Token learner + optional VSI: everything stage I trains."""

    def __init__(self, embed_dim: int, text_width: int, vision_width: int, n_blocks: int, cfg: MappingConfig):
        super().__init__()
        self.cfg = cfg
        self.token_learner = TokenLearner(embed_dim, text_width, cfg)
        self.vsi = VSI(vision_width, text_width, n_blocks, cfg) if cfg.vsi != "off" else None
