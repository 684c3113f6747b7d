"""Loading diffusers pipelines by hub id or local path; dtype, device and scheduler choices.

Hub ids resolve from the local cache only when HF_HUB_OFFLINE is set (or the name is a folder), so
CI never touches the network. Imports of torch/diffusers happen inside functions: `datagen` stays
importable without them.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..base.device import resolve_device, resolve_dtype

SCHEDULERS = {
    "euler_a": "EulerAncestralDiscreteScheduler",    # IP2P's sampler (k-diffusion Euler ancestral)
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
}


# SD 1.x's noise schedule: the default when a scheduler is built without a model config (tiny models).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is 1, true, yes or on (any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def make_scheduler(name: str, config: dict | None = None):
    """A scheduler by short name, built from `config` (the model's own scheduler config) if given.

    `default`: the config's own class (`euler_a` without a config); without a config the others use
    `SD_SCHEDULE`. Raises ValueError for a name not in `SCHEDULERS`."""
    import diffusers

    if name == "default":
        if config is None:
            name = "euler_a"
        else:
            return getattr(diffusers, config["_class_name"]).from_config(config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: default, {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    return cls.from_config(config if config is not None else SD_SCHEDULE)


def load_pipeline(model: str, kind: str, dtype: str = "auto", device: str = "auto", variant: str | None = None,
                  scheduler: str = "default", safety_checker: bool = False):
    """Load a text-to-image (`kind="t2i"`, SD 1.x/2.x, SDXL, SDXL-Turbo: chosen from model_index.json)
    or instruction-editing (`kind="edit"`, InstructPix2Pix) pipeline and move it to the device.

    Hub ids load from the local cache only under HF_HUB_OFFLINE; the safety checker is dropped unless
    `safety_checker`. Raises DeviceError (`resolve_device`) for an unusable device, ValueError for an
    unknown scheduler, and diffusers' own errors for a model it cannot find or load."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline, StableDiffusionInstructPix2PixPipeline

    dev = resolve_device(device)
    local = Path(model).is_dir()
    kw: dict = {"dtype": resolve_dtype(dtype, dev), "local_files_only": local or hub_offline()}
    if variant:
        kw["variant"] = variant
    index = DiffusionPipeline.load_config(model, local_files_only=kw["local_files_only"])
    if "safety_checker" in index and not safety_checker:
        # Triplet generation filters with CLIP later; the checker would black out images silently.
        kw.update(safety_checker=None, requires_safety_checker=False)
    cls = StableDiffusionInstructPix2PixPipeline if kind == "edit" else AutoPipelineForText2Image
    pipe = cls.from_pretrained(model, **kw)
    if scheduler != "default":
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)
