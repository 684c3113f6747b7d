"""Hub-free diffusers pipelines built from explicit configs: a public helper for offline dry runs of
a diffusers recipe (its wiring, shards, filters and timings, with random weights, on a CPU and
without a download), used by the tests and the CPU benches too; SD 1.5-size ones (random weights)
serve GPU throughput checks. Build one (`build_sd_pipeline(write_clip_tokenizer_files(dir))`),
`save_pretrained` it into a folder and point the recipe's `images.diffusion.model` at that folder.

Nothing here downloads anything: the CLIP tokenizer's vocab.json/merges.txt are written from the
BPE merges that open_clip ships, and every model is randomly initialised from a config dict.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

# SD 1.5's own component configs (UNet 860M, VAE 84M, CLIP ViT-L/14 text tower 123M).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
    hidden_act="quick_gelu", projection_dim=768,
)

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=32, sample_size=32,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, projection_dim=32,
)
# SDXL-class: text_time added conditioning, two text encoders (32 + 32 = 64-dim context),
# 6 time ids x 8 + pooled 32 = 80 projection inputs; linear projections as in SDXL.
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, norm_num_groups=32,
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
)


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write CLIP's vocab.json and merges.txt (ids identical to open_clip's tokenizer) into `folder`."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def clip_tokenizer(folder: str | Path):
    """A transformers CLIPTokenizer (77 tokens max) on the files `write_clip_tokenizer_files` puts in `folder`."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(folder)
    # model_max_length=77 is required: without it tokenising overflows.
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _seeded(seed: int):
    torch.manual_seed(seed)  # random init draws from the global RNG; make the weights reproducible


def build_sd_pipeline(tokenizer_dir: str | Path, unet: dict | None = None, vae: dict | None = None,
                      text: dict | None = None, seed: int = 0, scheduler: str = "euler_a", device: str = "cpu",
                      dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline (tiny by default) with random weights and no safety checker.
    Weights are initialised directly on `device` (fast for SD 1.5 sizes on a GPU)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .loading import make_scheduler

    _seeded(seed)
    tok = clip_tokenizer(tokenizer_dir)
    with torch.device(device):
        parts = dict(vae=AutoencoderKL(**(vae or TINY_VAE)),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**(text or TINY_TEXT))),
                     unet=UNet2DConditionModel(**(unet or TINY_UNET)))
    pipe = StableDiffusionPipeline(**parts, tokenizer=tok, scheduler=make_scheduler(scheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype) if dtype is not None else pipe


def build_sdxl_pipeline(tokenizer_dir: str | Path, seed: int = 0, scheduler: str = "euler_a"):
    """A tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .loading import make_scheduler

    _seeded(seed)
    tok = clip_tokenizer(tokenizer_dir)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)), tokenizer=tok, tokenizer_2=tok,
        unet=UNet2DConditionModel(**TINY_SDXL_UNET), scheduler=make_scheduler(scheduler),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_ip2p_pipeline(tokenizer_dir: str | Path, seed: int = 0, scheduler: str = "euler_a"):
    """A tiny StableDiffusionInstructPix2PixPipeline: its UNet takes 8 channels (noise + image latents)."""
    from diffusers import (AutoencoderKL, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from .loading import make_scheduler

    _seeded(seed)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        tokenizer=clip_tokenizer(tokenizer_dir), unet=UNet2DConditionModel(**{**TINY_UNET, "in_channels": 8}),
        scheduler=make_scheduler(scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd15_random(tokenizer_dir: str | Path, seed: int = 0, scheduler: str = "euler_a", device: str = "cpu",
                      dtype: torch.dtype | None = None):
    """SD 1.5-size pipeline (real dims, random weights): throughput checks without a download."""
    return build_sd_pipeline(tokenizer_dir, SD15_UNET, SD15_VAE, SD15_TEXT, seed, scheduler, device, dtype)
