"""Losses of both stages.

- `contrastive`: symmetric InfoNCE between two sets of embeddings (image <-> `a photo of $`),
  over the global batch under DDP via a differentiable all-gather;
- `soft_text_alignment`: the pseudo-sentence's similarity distribution over the in-batch captions
  is pulled (KL) toward the captions' own similarity distribution (a soft target instead of
  one-hot), so the pseudo-word behaves like real words;
- `hard_negative_infonce`: composed query -> target image over in-batch targets plus K mined
  negatives per query (stage II).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather with gradients (identity without DDP); returns (global tensor, rank offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE; a, b L2-normalised [B, D]. Local rows against global columns."""
    ga, off = gather(a)
    gb, _ = gather(b)
    labels = torch.arange(a.shape[0], device=a.device) + off
    return 0.5 * (F.cross_entropy(scale * a @ gb.T, labels) + F.cross_entropy(scale * b @ ga.T, labels))


def soft_text_alignment(pseudo: torch.Tensor, captions: torch.Tensor, scale: torch.Tensor | float,
                        target_temperature: float = 0.05) -> torch.Tensor:
    """KL(soft target || prediction) over in-batch captions.

    pseudo: [B, D] normalised features of `a photo of $` for image i;
    captions: [B, D] normalised features of image i's caption (frozen).
    Target row i = softmax(cap_i . cap_j / target_temperature): captions describing similar images
    share probability mass instead of a one-hot on caption i.
    """
    gc, _ = gather(captions)
    with torch.no_grad():
        target = F.softmax(captions @ gc.T / target_temperature, dim=-1)
    logp = F.log_softmax(scale * pseudo @ gc.T, dim=-1)
    return F.kl_div(logp, target, reduction="batchmean")


def hard_negative_infonce(query: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None,
                          scale: torch.Tensor | float) -> torch.Tensor:
    """InfoNCE from each query to its target over in-batch targets plus its own K negatives.

    query, targets: [B, D] normalised; negatives: [B, K, D] normalised (or None).
    """
    gt, off = gather(targets)
    logits = scale * query @ gt.T                                      # [B, B_global]
    if negatives is not None and negatives.numel():
        neg = scale * torch.einsum("bd,bkd->bk", query, negatives)      # [B, K]
        logits = torch.cat([logits, neg], dim=1)
    labels = torch.arange(query.shape[0], device=query.device) + off
    return F.cross_entropy(logits, labels)
