"""One training loop for both stages.

The caller supplies a trainable module, a loss function over a batch of dataset indices, and the
dataset size; the loop owns everything else: seeded per-epoch order, AMP (bf16 autocast on CUDA),
gradient clipping, torchrun/DDP (gradients averaged across ranks; the losses all-gather
embeddings differentiably), JSONL metrics (TensorBoard optional), a progress bar, and atomic
safetensors checkpoints with `--resume` that continues bitwise-identically on CPU.

Checkpoint layout in `OUT/checkpoints/`: `step-NNNNNN.safetensors` (trainable weights) and
`state.pt` (optimizer, step, RNG states, the weights file it belongs to), written in that order,
each by temp file + rename, so a kill at any moment leaves a consistent pair.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from datagen.base.config import ConfigError, at_least
from datagen.base.errors import InputError
from datagen.base.io import read_json, write_atomic, write_atomic_with


@dataclass
class TrainConfig:
    """The `train` section of a stage-I or stage-II recipe: optimiser, schedule, AMP, checkpoint and logging
    settings of `fit`."""

    seed: int = 0
    epochs: int = at_least(1, 5)
    batch_size: int = at_least(1, 256)   # global batch (split across DDP ranks)
    lr: float = 1e-4                  # TSCIR (`src/params.py`): 1e-4
    weight_decay: float = 0.1         # TSCIR: 0.1, not applied to norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])   # AdamW (TSCIR / CLIP)
    eps: float = 1e-6
    decay_norms_and_biases: bool = False   # true: weight decay on every parameter (cirgen's first design)
    warmup_steps: int = at_least(0, 50)
    grad_clip: float = at_least(0.0, 1.0)   # max gradient norm; 0 = off
    amp: str = "auto"                 # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    grad_checkpointing: bool = False
    ckpt_every: int = at_least(1, 100)   # steps
    log_every: int = at_least(1, 10)
    tensorboard: bool = False
    threads: int = at_least(0, 0)     # torch CPU threads (0 = leave as is)
    stop_after: int | None = at_least(1, None)   # stop (as if interrupted) after this many steps; for tests

    def validate(self) -> None:
        """Raise ValueError unless `amp` is auto, bf16 or fp32 and `betas` has two numbers (`from_dict`
        turns it into a ConfigError; the counts' lower bounds are `at_least` on the fields)."""
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError("amp must be auto, bf16 or fp32")
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected two numbers, got {self.betas}")


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_info()


def rank_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun, a plain `cuda` means the GPU of this rank
    (`cuda:LOCAL_RANK`, made current), so ranks do not share GPU 0; anything else as given."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _lr(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with TSCIR's settings (`src/main.py`): betas, eps and weight decay from `cfg`; tensors
    with fewer than 2 dimensions (biases, LayerNorm/BatchNorm gains) get no decay unless
    `decay_norms_and_biases`."""
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.decay_norms_and_biases:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=betas, eps=cfg.eps)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold to continue bitwise: the trainable parameters and every
    persistent buffer (BatchNorm running statistics change while training too)."""
    names = {id(p) for p in module.parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict(keep_vars=True).items()
            if id(v) in names or not isinstance(v, torch.nn.Parameter)}


def fit(module: torch.nn.Module, params: list[torch.nn.Parameter], n_items: int,
        loss_fn: Callable[[np.ndarray], tuple[torch.Tensor, dict]], cfg: TrainConfig, out: str | Path,
        resume: bool = False, on_epoch_start: Callable[[int], dict | None] | None = None,
        log: Callable[[str], None] = print,
        train_mode: Callable[[torch.nn.Module], None] | None = None) -> dict:
    """Train `params` (inside `module`, whose trainable state is checkpointed) for cfg.epochs.

    loss_fn(indices) -> (loss, metrics) for this rank's share of a global batch of dataset indices.
    on_epoch_start(epoch) runs before each epoch (e.g. hard-negative mining) and may return metrics;
    on a resume it runs again for the resumed epoch, so it must give what it gave the first time.
    train_mode(module) sets train/eval modes before each step (default: `module.train()`).

    Learning rate: linear warmup over `warmup_steps` (lr * (step + 1) / warmup_steps), then cosine decay to 0
    over the remaining steps, as open_clip's `cosine_lr`. Each epoch's order is a permutation seeded by
    (seed, epoch). With fewer items than `batch_size`, the batch becomes every item (rounded down to a
    multiple of the world size). Returns the last step's record (step, epoch, loss, lr, grad_norm, the
    loss_fn metrics; `stopped: True` when `stop_after` ended it). Raises InputError when `batch_size` is not
    divisible by the world size or there are fewer items than ranks; ValueError when a resumed checkpoint
    has keys `module` does not; MachineError when a checkpoint (or, on resume, the trimmed metrics file)
    cannot be written.
    """
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    rank, world = dist_info()
    out = Path(out)
    ck = out / "checkpoints"
    if rank == 0:
        ck.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise InputError(f"batch_size {cfg.batch_size} is not divisible by {world} ranks")
    if n_items < world:
        raise InputError(f"{n_items} items cannot fill a batch on {world} ranks")
    if n_items < cfg.batch_size:
        # Fewer items than one batch (a small quantity in a data study): every step sees them all.
        cfg = dataclasses.replace(cfg, batch_size=n_items - n_items % world)
        log(f"{n_items} items is less than one batch: batch_size {cfg.batch_size} (all items every step)")
    steps_per_epoch = n_items // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total <= cfg.warmup_steps and rank == 0:
        # Legitimate (a small cell of a data study), but a short run that barely moves should say so.
        log(f"all {total} steps are inside the warm-up (train.warmup_steps={cfg.warmup_steps}): the learning "
            f"rate never reaches train.lr={cfg.lr:g}; more epochs or a shorter warm-up train more")
    opt = make_optimizer(params, cfg)
    step = 0
    torch.manual_seed(cfg.seed * 1000 + rank)
    state_path = ck / "state.pt"
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        missing = module.load_state_dict(load_file(ck / st["weights"]), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{ck / st['weights']}: unexpected keys {missing.unexpected_keys[:3]}")
        opt.load_state_dict(st["opt"])
        step = int(st["step"])
        torch.set_rng_state(st["torch_rng"][rank] if st["torch_rng"].dim() > 1 else st["torch_rng"])
        log(f"resumed from {ck / st['weights']} at step {step}")
    elif resume:
        log(f"--resume: no checkpoint in {ck}; starting from scratch")
    device = params[0].device
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        _cut_metrics(metrics_path, step)
    mf = open(metrics_path, "a") if rank == 0 else None
    tb = None
    if cfg.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))
    bar = tqdm(total=total, initial=step, desc=out.name, unit="step", disable=rank != 0)
    t0, last = time.time(), {}
    per_rank = cfg.batch_size // world
    epoch = step // steps_per_epoch
    try:
        while step < total:
            epoch = step // steps_per_epoch
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n_items)
            extra = (on_epoch_start(epoch) or {}) if on_epoch_start else {}
            if extra and mf:
                mf.write(json.dumps({"epoch": epoch, "step": step, **extra}) + "\n")
            for b in range(step % steps_per_epoch, steps_per_epoch):
                batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size][rank * per_rank:(rank + 1) * per_rank]
                for g in opt.param_groups:
                    g["lr"] = _lr(step, total, cfg)
                (train_mode or torch.nn.Module.train)(module)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, metrics = loss_fn(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)
                        p.grad /= world
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
                opt.step()
                step += 1
                last = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": _lr(step - 1, total, cfg),
                        **{k: float(v) for k, v in metrics.items()}}
                if gnorm is not None:
                    last["grad_norm"] = float(gnorm)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                if mf and (step % cfg.log_every == 0 or step == total):
                    mf.write(json.dumps({**last, "seconds": round(time.time() - t0, 2)}) + "\n")
                    mf.flush()
                    if tb:
                        for k, v in last.items():
                            tb.add_scalar(k, v, step)
                if step % cfg.ckpt_every == 0 or step == total or step == cfg.stop_after:
                    _checkpoint(module, opt, step, ck, rank, world, save_file)
                if cfg.stop_after is not None and step >= cfg.stop_after:
                    return {**last, "stopped": True}
    finally:      # also when stop_after ends the run or a step raises
        bar.close()
        if mf:
            mf.close()
        if tb:
            tb.close()
    return last


def claim_run_folder(out: Path, rhash: str, resume: bool, record: dict) -> None:
    """Make `out` this run's folder and record the run's identity in recipe.json
    (`{"hash": rhash, **record}`).

    A folder that already holds a run (recipe.json or model.json, of any stage) is taken only with
    `resume` and only when it is the same run (same hash): a finished model is never overwritten
    by accident. Errors: InputError (one line) for a folder holding a run without `resume`, or a
    `resume` of another recipe or stage-I run; ConfigError for an unreadable recipe.json."""
    out.mkdir(parents=True, exist_ok=True)
    prev = out / "recipe.json"
    if not resume and (prev.exists() or (out / "model.json").exists()):
        raise InputError(f"{out} already holds a run: pass --resume to continue it (same recipe), "
                         "or use a new --out")
    if resume and prev.exists() and read_json(prev, dict, ConfigError).get("hash") != rhash:
        raise InputError(f"{out}: --resume with a different recipe or stage-I run (hash mismatch); "
                         "use a new --out")
    write_atomic(prev, json.dumps({"hash": rhash, **record}, indent=2))


def _cut_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines of steps <= `step` (the checkpoint a run starts from), so a
    resumed run does not log the replayed steps twice; a torn last line (a kill mid-write) goes too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    write_atomic(path, "".join(l + "\n" for l in keep))


def _checkpoint(module, opt, step, ck: Path, rank: int, world: int, save_file) -> None:
    rng = torch.get_rng_state()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rng = torch.stack(gathered)
    if rank != 0:
        return
    name = f"step-{step:06d}.safetensors"
    write_atomic_with(ck / name, lambda p: save_file(trainable_state(module), str(p)))
    write_atomic_with(ck / "state.pt", lambda p: torch.save({"opt": opt.state_dict(), "step": step, "torch_rng": rng,
                                                    "weights": name}, p))
    for old in ck.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
