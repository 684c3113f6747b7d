"""Loss terms of both stages, each a named function (formulas from the released TSCIR code,
`src/trainer.py`: `get_loss_img2text` for stage I, `get_loss_img2text_stage2` for stage II).

Conventions: every feature is L2-normalised; `scale` is the logit scale 1/T (TSCIR: T = 0.07 in
stage I, 0.01 in stage II, fixed). Under DDP each rank computes its own rows against the global
batch's columns (a differentiable all-gather), and the train loop averages gradients over ranks;
with one process the global batch is the local one.

Stage I:  L = contrastive(pseudo, target view) + w_ref * contrastive(pseudo, reference view)
              + w_kl * soft_text_alignment(caption, pseudo, target view)
Stage II: L = composed_contrastive(query, target; mixed hard negatives)
              + contrastive(map query, reference) + w_kl * soft_text_alignment(caption, map, target)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def logit_scale(temperature: float | None, learnt: torch.Tensor) -> torch.Tensor | float:
    """1/T for a fixed temperature T (TSCIR: 0.07 in stage I, 0.01 in stage II), or CLIP's learnt
    scale `learnt` (a 0-d tensor, returned as is) when T is None. T is in cosine-similarity units:
    logits are cosines in [-1, 1] times 1/T. Errors: ValueError for T <= 0."""
    if temperature is None:
        return learnt
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (or null for CLIP's learnt scale)")
    return 1.0 / temperature


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather with gradients (identity without DDP) -> (global [B_global, ...], this rank's
    row offset).

    x: [B, ...] this rank's rows; B_global = world size x B and the offset is rank x B, so every
    rank must hold the same B (`torch.distributed.nn.functional.all_gather`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def contrastive(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss, Radford et al., 2021): 0.5 * (CE(s a b^T, I) + CE(s b a^T, I)).

    a, b: [B, D] normalised, row i of a matches row i of b; under DDP this rank's rows are scored
    against the gathered [B_global, D] columns. s: the logit scale (`logit_scale`). Returns a
    scalar (mean cross-entropy, nats). TSCIR uses it for both stage I terms and stage II's L_map."""
    ga, off = gather(a)
    gb, _ = gather(b)
    labels = torch.arange(a.shape[0], device=a.device) + off
    return 0.5 * (F.cross_entropy(scale * a @ gb.T, labels) + F.cross_entropy(scale * b @ ga.T, labels))


def soft_text_alignment(captions: torch.Tensor, texts: torch.Tensor, images: torch.Tensor,
                        scale: torch.Tensor | float) -> torch.Tensor:
    """TSCIR's soft text alignment: KL(q || p), batch mean, with

        p_i = softmax_j(s c_i . t_j)   (caption i over the batch's pseudo-sentences t)
        q_i = softmax_j(s c_i . v_j)   (caption i over the batch's image embeddings v)

    so the caption's similarity pattern over pseudo-sentences is pulled toward its pattern over
    images (released: `F.kl_div(log p, q, reduction='batchmean')`, TSCIR `src/trainer.py`).
    captions, texts, images: [B, D] normalised (captions and images frozen); p and q are
    [B, B_global] over the gathered texts and images. Gradients flow through t (and q if v has any).
    Returns a scalar (nats).
    """
    gt, _ = gather(texts)
    gv, _ = gather(images)
    log_p = F.log_softmax(scale * captions @ gt.T, dim=-1)
    q = F.softmax(scale * captions @ gv.T, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean")


def caption_soft_alignment(pseudo: torch.Tensor, captions: torch.Tensor, scale: torch.Tensor | float,
                           target_temperature: float = 0.05) -> torch.Tensor:
    """cirgen's first design (an option): KL(target || prediction) over in-batch captions, with
    prediction_i = softmax_j(s pseudo_i . cap_j) and target_i = softmax_j(cap_i . cap_j / tau):
    captions describing similar images share probability mass (tau = `target_temperature`, in
    cosine units; no gradient through the target). pseudo, captions: [B, D] normalised. Returns a
    scalar (nats). Source: cirgen's own."""
    gc, _ = gather(captions)
    with torch.no_grad():
        target = F.softmax(captions @ gc.T / target_temperature, dim=-1)
    logp = F.log_softmax(scale * pseudo @ gc.T, dim=-1)
    return F.kl_div(logp, target, reduction="batchmean")


def mixed_hard_negatives(query: torch.Tensor, targets_global: torch.Tensor, offset: int, k: int,
                         ) -> torch.Tensor:
    """TSCIR's mixed hard negatives, as logits q_i . h_ij (not multiplied by any scale) [B, k].

    For query i: j ranges over the k highest-scoring wrong targets (q_i . t_j, own target
    excluded); w_ij = s_ij min-max normalised over row i of the target-target cosines s;
    h_ij = w_ij t_i + (1 - w_ij) t_j (not re-normalised). query: [B, D] this rank's rows;
    targets_global: [B_global, D]; offset: this rank's first row in the global batch. k is capped
    at B_global - 1. The negatives are built under `no_grad`: gradients reach only `query`.
    Source: `src/trainer.py`, `get_loss_img2text_stage2` (`top_indices`, `mix_weight`, `mix_sim`)."""
    b = query.shape[0]
    rows = torch.arange(b, device=query.device)
    own = rows + offset
    k = min(k, targets_global.shape[0] - 1)
    with torch.no_grad():
        scores = query @ targets_global.T
        scores[rows, own] = float("-inf")
        top = scores.topk(k, dim=1).indices                                   # [B, k]
        t_own = targets_global[own]                                           # [B, D]
        sim = t_own @ targets_global.T                                        # [B, B_global]
        lo, hi = sim.min(dim=1, keepdim=True).values, sim.max(dim=1, keepdim=True).values
        w = ((sim - lo) / (hi - lo + 1e-8)).gather(1, top)[..., None]        # [B, k, 1]
        mixed = w * t_own[:, None, :] + (1 - w) * targets_global[top]         # [B, k, D]
    return torch.einsum("bd,bkd->bk", query, mixed.to(query.dtype))


def composed_contrastive(query: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float,
                         k: int = 10, scale_negatives: bool = False) -> torch.Tensor:
    """Stage II's main term: (L_i2t + L_t2i) / 2.

    L_i2t = CE(s t q^T): each target image over the batch's composed queries;
    L_t2i = CE([s q t^T, n]): each query over the batch's targets plus its k mixed hard
    negatives n (`mixed_hard_negatives`), appended unscaled as released (`scale_negatives=False`;
    next to logits scaled by 1/0.01 they carry almost no weight) or multiplied by s
    (`scale_negatives=True`). k = 0 turns them off (so does a global batch of one).
    query, targets: [B, D] normalised, row i of each a pair; gathered under DDP. Returns a scalar.
    Source: TSCIR `src/trainer.py`, `get_loss_img2text_stage2` (multi-GPU branch)."""
    gq, off = gather(query)
    gt, _ = gather(targets)
    labels = torch.arange(query.shape[0], device=query.device) + off
    l_i2t = F.cross_entropy(scale * targets @ gq.T, labels)
    logits = scale * query @ gt.T
    if k > 0 and gt.shape[0] > 1:
        neg = mixed_hard_negatives(query, gt, off, k)
        logits = torch.cat([logits, scale * neg if scale_negatives else neg], dim=1)
    l_t2i = F.cross_entropy(logits, labels)
    return 0.5 * (l_i2t + l_t2i)


def hard_negative_infonce(query: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None,
                          scale: torch.Tensor | float) -> torch.Tensor:
    """cirgen's first stage II loss (an option): CE of each query over in-batch targets plus its
    own K mined negatives (text-to-image direction only; negative logits are multiplied by s).
    query, targets: [B, D] normalised; negatives: [B, K, D] or None. Returns a scalar."""
    gt, off = gather(targets)
    logits = scale * query @ gt.T                                      # [B, B_global]
    if negatives is not None and negatives.numel():
        neg = scale * torch.einsum("bd,bkd->bk", query, negatives)      # [B, K]
        logits = torch.cat([logits, neg], dim=1)
    labels = torch.arange(query.shape[0], device=query.device) + off
    return F.cross_entropy(logits, labels)
