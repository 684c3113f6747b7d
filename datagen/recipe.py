"""Generation recipes: which caption source, edit backend, image backend, quality and filters.

A recipe is a YAML file (see `recipes/gen/`); `load_gen_recipe` resolves a name or a path, applies
`--set key=value` overrides and validates every key. `identity()` is the part that decides the
data: two runs with the same identity and seed write the same records, whatever the worker count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base.config import ConfigError, at_least, read_yaml, stable_hash, to_dict
from .base.recipes import PROSE_FIELDS, RecipeProse, load_recipe, resolve_recipe_path
from .world.editor import FAILURES
from .world.phrases import EDIT_TYPES


LLM_BACKENDS = ("transformers", "vllm", "openai")


@dataclass
class TextRuntimeConfig:
    """How an LLM backend runs, not what it writes (batching, device, server, retries, cache).

    Kept in its own section so that `identity()` can leave it out: changing concurrency or the
    server address must not make a dataset look like another recipe's. The one exception is
    transformers' `batch_size`, which changes the sampled text (see `GenRecipe.identity`).
    """
    batch_size: int = 16            # transformers: prompts per generate() call (part of the hash:
                                    # padding and kernel shapes change the sampled text)
    device: str = "auto"            # transformers: auto = cuda when visible, else cpu
    base_url: str = "http://127.0.0.1:8000/v1"   # openai: the server (e.g. `vllm serve`)
    api_key_env: str = "OPENAI_API_KEY"  # openai: env var holding the key (never in a recipe)
    concurrency: int = 8            # openai: requests in flight
    timeout_s: float = 120.0        # openai: per request
    retries: int = 3                # openai: retries after the first try (exponential backoff)
    backoff_s: float = 1.0          # openai: first wait; doubles on every retry
    cache_dir: str | None = None    # openai: on-disk reply cache (reruns do not re-query)

    def validate(self) -> None:
        """Raise ValueError unless batch_size, concurrency >= 1, retries >= 0, timeout_s > 0 and
        backoff_s >= 0 (`from_dict` turns it into a ConfigError)."""
        if self.batch_size < 1 or self.concurrency < 1 or self.retries < 0:
            raise ValueError("batch_size and concurrency must be >= 1, retries >= 0")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("timeout_s must be > 0 and backoff_s >= 0")


@dataclass
class LLMConfig:
    """A language model behind the transformers, vllm or openai text backend."""
    model: str = ""                 # hub id or local dir; a .gguf file; pypi:<package>; served name
    revision: str | None = None
    gguf_file: str | None = None    # transformers: GGUF file inside `model`
    format: Literal["auto", "chat", "completion"] = "auto"   # auto: chat iff a chat template
    structured: bool = True         # vllm/openai chat: constrain replies to the JSON schema
    examples: int = 6               # few-shot examples per prompt (drawn per candidate)
    temperature: float = 0.7        # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    attempts: int = 1               # tries per candidate: a reply the parser rejects is re-sampled
                                    # with a new seed (IP2P: up to 3); the last reason is counted
    dtype: str = "auto"             # auto: bfloat16 on GPU, float32 on CPU
    trust_remote_code: bool = False  # never on by default: it runs code from the model repo
    chat_template_kwargs: dict = field(default_factory=dict)   # e.g. {enable_thinking: false}
    # vllm engine
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    runtime: TextRuntimeConfig = field(default_factory=TextRuntimeConfig)

    def validate(self) -> None:
        """Raise ValueError unless temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0, max_new_tokens,
        attempts and tensor_parallel_size >= 1, examples >= 0 and `chat_template_kwargs` is a mapping.
        `runtime` validates itself when the recipe is read; `model` is checked by the section using it."""
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, repetition_penalty > 0")
        if min(self.max_new_tokens, self.attempts, self.tensor_parallel_size) < 1 or self.examples < 0:
            raise ValueError("max_new_tokens, attempts and tensor_parallel_size must be >= 1, examples >= 0")
        if not isinstance(self.chat_template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be a mapping")


@dataclass
class CaptionsConfig:
    """`captions`: where source captions come from (shapes scenes, a caption file or dataset, or an LLM);
    built by `datagen.captions.build_captions` (`datagen.text.sources` for file, hf_disk, llm)."""
    source: Literal["shapes", "file", "hf_disk", "llm"] = "shapes"
    # shapes: scenes described with a phrase set
    phrases: Literal["train", "heldout"] = "train"
    min_objects: int = 1
    max_objects: int = 4
    # file (.txt one caption a line, .csv/.tsv, .jsonl, .parquet) or hf_disk (save_to_disk folder)
    path: str = ""
    column: str = "caption"         # csv/tsv/jsonl/parquet/hf_disk column
    split: str | None = None        # hf_disk: split of a DatasetDict
    bad_rows: Literal["error", "skip"] = "error"   # empty caption / broken row: stop or count
    max_words: int = 0              # longer captions are skipped (counted); 0 = no limit
    dedup: Literal["none", "exact", "near"] = "near"
    near_threshold: float = 0.8     # word-set Jaccard at or above which captions are near-duplicates
    order: Literal["shuffled", "sequential"] = "shuffled"
    reserve: int = 4                # caption slots reserved per kept triplet of a unit (see sources)
    # llm: an LLM writes one caption per candidate about a topic
    topics: list[str] = field(default_factory=list)
    topics_file: str = ""           # one topic a line (added to `topics`)
    llm_backend: Literal["transformers", "vllm", "openai"] = "transformers"
    llm: LLMConfig = field(default_factory=LLMConfig)

    def validate(self) -> None:
        """Raise ValueError unless 1 <= min_objects <= max_objects <= 9, `path` is set for source file /
        hf_disk, topics (or topics_file) and `llm.model` are set for source llm, 0 < near_threshold <= 1,
        reserve >= 1 and max_words >= 0. The file itself is not opened here."""
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got "
                             f"{self.min_objects}..{self.max_objects}")
        if self.source in ("file", "hf_disk") and not self.path:
            raise ValueError(f"source {self.source!r} needs path")
        if self.source == "llm" and not (self.topics or self.topics_file):
            raise ValueError("source 'llm' needs topics or topics_file")
        if self.source == "llm" and not self.llm.model:
            raise ValueError("source 'llm' needs llm.model")
        if not 0.0 < self.near_threshold <= 1.0 or self.reserve < 1 or self.max_words < 0:
            raise ValueError("need 0 < near_threshold <= 1, reserve >= 1, max_words >= 0")


@dataclass
class EditsConfig:
    """`edits`: the backend that writes the modification text and the target caption (rules, keywords or an
    LLM)."""
    # rules: shapes-world scene edits; keywords: term substitution in real captions (no model);
    # transformers / vllm / openai: an LLM writes (instruction, edited caption)
    backend: Literal["rules", "keywords", "transformers", "vllm", "openai"] = "rules"
    types: list[str] = field(default_factory=lambda: list(EDIT_TYPES))   # rules only
    vocabulary: str = ""            # keywords: YAML of substitutable terms ("" = shipped)
    examples_file: str = ""         # LLMs: few-shot examples YAML ("" = shipped)
    max_instruction_words: int = 40  # the parser rejects longer output as text_too_long
    max_caption_words: int = 77
    llm: LLMConfig = field(default_factory=LLMConfig)

    def validate(self) -> None:
        """Raise ValueError unless `types` names at least one known edit type (`EDIT_TYPES`), an LLM backend
        has `llm.model`, and both word limits are >= 1. `types` is checked for every backend."""
        bad = [t for t in self.types if t not in EDIT_TYPES]
        if bad or not self.types:
            raise ValueError(f"types: unknown edit type {bad[0]!r}; known: {list(EDIT_TYPES)}"
                             if bad else "types: must name at least one edit type")
        if self.backend in LLM_BACKENDS and not self.llm.model:
            raise ValueError(f"backend {self.backend!r} needs llm.model")
        if self.max_instruction_words < 1 or self.max_caption_words < 1:
            raise ValueError("max_instruction_words and max_caption_words must be >= 1")


def _check_range(name: str, lo_hi: list[float], lo: float, hi: float) -> None:
    if len(lo_hi) != 2 or not lo <= lo_hi[0] <= lo_hi[1] <= hi:
        raise ValueError(f"{name}: {lo_hi} must be [low, high] with {lo} <= low <= high <= {hi}")


@dataclass
class DiffusionConfig:
    """The diffusers image backends (datagen.diffusion). Ranges are [low, high]; each sample draws
    uniformly from them with the candidate's seeded rng (low == high: a fixed value)."""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # text-to-image: hub id or local folder
    edit_model: str = "timbrooks/instruct-pix2pix"   # diffusers-edit: instruction-editing model
    variant: str | None = None      # weight-file variant, e.g. "fp16"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"   # auto: bf16/fp16 on CUDA, fp32 on CPU
    device: str = "auto"            # auto = cuda when visible, else cpu
    scheduler: Literal["default", "euler_a", "euler", "ddim", "dpmpp"] = "euler_a"   # IP2P: Euler ancestral
    steps: int = 50                 # text-to-image steps (IP2P: 100; its README: 25 usually enough)
    guidance: list[float] = field(default_factory=lambda: [7.5, 15.0])   # text CFG; SDXL-Turbo: [0, 0]
    share_fraction: list[float] = field(default_factory=lambda: [0.1, 0.9])  # p: steps with shared self-attn
    share: Literal["attention", "kv"] = "attention"   # IP2P copies attention maps; kv: StyleAligned-like
    negative_prompt: str = ""
    edit_steps: int = 50            # diffusers-edit: instruction-editing steps
    edit_guidance: list[float] = field(default_factory=lambda: [7.5, 7.5])    # IP2P text CFG
    image_guidance: list[float] = field(default_factory=lambda: [1.2, 2.0])   # IP2P image CFG (edit strength)
    samples_per_prompt: int = 1     # k pairs per candidate; the best by directional similarity is kept
    pairs_per_call: int = 8         # image pairs per pipeline call (memory); same draws, but kernel
                                    # shapes change last bits: part of the hash; every call is padded to it
    retries: int = 1                # redraws of a sample whose image is NaN/black or whose call failed
    safety_checker: bool = False    # load the model's NSFW checker (flagged pairs: image_nsfw)

    def validate(self) -> None:
        """Raise ValueError unless every range is [low, high] with low <= high (guidance scales in [0, 100],
        `share_fraction` in [0, 1]), steps, edit_steps, samples_per_prompt, pairs_per_call >= 1, retries >= 0."""
        _check_range("guidance", self.guidance, 0.0, 100.0)
        _check_range("share_fraction", self.share_fraction, 0.0, 1.0)
        _check_range("edit_guidance", self.edit_guidance, 0.0, 100.0)
        _check_range("image_guidance", self.image_guidance, 0.0, 100.0)
        if min(self.steps, self.edit_steps, self.samples_per_prompt, self.pairs_per_call) < 1 or self.retries < 0:
            raise ValueError("steps, edit_steps, samples_per_prompt and pairs_per_call must be >= 1, retries >= 0")


@dataclass
class ImagesConfig:
    """`images`: the image backend (shapes renderer or diffusers), output size and format; `diffusion`
    is used only by the diffusers backends."""
    backend: Literal["shapes", "diffusers-paired", "diffusers-edit"] = "shapes"
    resolution: int = 128
    format: Literal["png", "jpeg", "webp"] = "jpeg"
    # shapes renderer nuisance variation
    jitter: float = 0.08
    rotation: float = 12.0
    scale_jitter: float = 0.08
    color_jitter: int = 12
    noise: float = 4.0
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def validate(self) -> None:
        """Raise ValueError unless 16 <= resolution <= 2048 pixels, and a multiple of 8 for a diffusers
        backend (the VAE downsamples by 8)."""
        if not 16 <= self.resolution <= 2048:
            raise ValueError(f"resolution: {self.resolution} is outside 16..2048")
        if self.backend.startswith("diffusers") and self.resolution % 8:
            raise ValueError(f"resolution: {self.resolution} must be a multiple of 8 for {self.backend}")


@dataclass
class QualityConfig:
    """`quality`: the tier name (selects `filters.clip.tiers`, stored in each record's `quality`) and the
    injected generator failure rates."""
    tier: str = "high"
    # Probability that a triplet carries each generator failure (see datagen.world.editor).
    failure_rates: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError for a failure name not in `FAILURES`, a rate outside [0, 1], or rates adding
        up to more than 1."""
        for k, v in self.failure_rates.items():
            if k not in FAILURES:
                raise ValueError(f"failure_rates: unknown failure {k!r}; known: {list(FAILURES)}")
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"failure_rates.{k}: {v} is not a probability")
        if sum(self.failure_rates.values()) > 1.0 + 1e-9:
            raise ValueError("failure_rates: the rates add up to more than 1")


@dataclass
class TextFilterConfig:
    """`filters.text`: rejects empty or over-long modification texts and no-op edits (`datagen.filters.TextFilter`)."""
    enabled: bool = True
    max_words: int = 40            # longer instructions are rejected as over-long


@dataclass
class ClipThresholds:
    """Minimum raw cosines; a criterion set to null is scored and stored but never rejects.

    Defaults are InstructPix2Pix's for OpenAI CLIP ViT-L/14 (InstructPix2Pix, Brooks et al., CVPR 2023). Another CLIP
    (e.g. shapes-CLIP) has another score scale: calibrate (datagen.calibrate) before trusting them.
    """
    img_img: float | None = 0.7     # cos(E_ref, E_tgt)
    img_cap: float | None = 0.2     # each image against its own caption (both must pass)
    dir: float | None = 0.2         # directional similarity
    instr_tgt: float | None = None  # instruction vs target image (CompoDiff LLM branch: 0.2)

    def validate(self) -> None:
        """Raise ValueError for a threshold that is set and outside [-1, 1] (not a cosine)."""
        for k, v in vars(self).items():
            if v is not None and not -1.0 <= v <= 1.0:
                raise ValueError(f"{k}: {v} is not a cosine in [-1, 1]")


@dataclass
class ClipFilterConfig:
    """`filters.clip`: CLIP-score filtering of triplets with InstructPix2Pix-style thresholds
    (`datagen.filters.ClipFilter`)."""
    enabled: bool = False
    model: str = "ViT-L-14"         # any open_clip model name, or shapes-clip
    pretrained: str | None = "openai"   # tag or local weights file; null = shipped (shapes-clip)
    random_init: bool = False       # random weights (tests and benchmarks only)
    device: str = "auto"            # auto = cuda when visible, else cpu
    batch_size: int = at_least(1, 64)   # images per forward pass
    score_instruction: bool = False  # also store score_clip_instr_tgt without a threshold
    thresholds: ClipThresholds = field(default_factory=ClipThresholds)
    # Per quality tier: the entry named by `quality.tier` replaces `thresholds`.
    tiers: dict[str, ClipThresholds] = field(default_factory=dict)


@dataclass
class DedupeConfig:
    """Perceptual-hash near-duplicate removal within a work unit (see datagen.dedupe for scope)."""
    enabled: bool = False
    max_distance: int = at_least(0, 4)   # Hamming bits (summed over channels) counted as near-duplicate
    match: Literal["pair", "either"] = "pair"   # pair: ref AND target near one earlier triplet
    channels: Literal["gray", "rgb"] = "gray"   # rgb: one 64-bit pHash per channel (sees colour)
    cross_unit_report: bool = True  # stats.json lists near-duplicates across units (not removed)


@dataclass
class ContaminationConfig:
    """Reject triplets whose reference or target is a near-copy of a benchmark gallery image."""
    enabled: bool = False
    galleries: list[str] = field(default_factory=list)   # folders, searched recursively for images
    max_distance: int = at_least(0, 4)   # pHash Hamming bits at or below which an image is contaminated
    channels: Literal["gray", "rgb"] = "gray"
    cache_dir: str | None = None    # gallery hash cache; null = <gallery>/.cirgen-cache or ~/.cache
    clip_threshold: float | None = None  # also reject at CLIP cosine >= this (filters.clip's model)

    def validate(self) -> None:
        """Raise ValueError when enabled with no `galleries`; the folders are not checked here."""
        if self.enabled and not self.galleries:
            raise ValueError("enabled needs at least one folder in galleries")


@dataclass
class FiltersConfig:
    """`filters`: the text, CLIP, contamination and dedupe filters (reject order, `build_filters`)."""
    text: TextFilterConfig = field(default_factory=TextFilterConfig)
    clip: ClipFilterConfig = field(default_factory=ClipFilterConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)


@dataclass
class PipelineConfig:
    """`pipeline`: how the run is cut into work units and batches and how many processes run them."""
    unit_size: int = 500           # kept triplets per work unit (= per shard)
    batch_size: int = 100          # candidates per stage call; changes the data only with an
                                   # in-process LLM (transformers, vllm): then part of the hash
    workers: int = 0               # processes; 0 = one per CPU core; does not change the data

    def validate(self) -> None:
        """Raise ValueError unless unit_size and batch_size are >= 1 and workers >= 0."""
        if self.unit_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("unit_size and batch_size must be >= 1, workers >= 0")


@dataclass
class GenRecipe(RecipeProse):
    """A generation recipe (`recipes/gen/*.yaml`, kind gen): the whole `cirgen triplets` configuration."""
    kind: Literal["gen"] = "gen"
    name: str = "shapes-high"
    seed: int = 0
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    edits: EditsConfig = field(default_factory=EditsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def identity(self) -> dict:
        """What decides the records: not the name, prose, seed or worker count, and not how a
        backend runs (device, server, concurrency, cache). Sections of backends the recipe does
        not use are left out, so adding a backend elsewhere changes no hash.

        Batch sizes are left out where records do not depend on them: diffusion calls always hold
        `pairs_per_call` pairs and CLIP always scores fixed row blocks, whatever
        `pipeline.batch_size` / `filters.clip.batch_size`. They are part of it for in-process LLM
        backends (transformers, vllm), whose sampled text depends on the prompts batched together:
        `pipeline.batch_size`, and transformers' `llm.runtime.batch_size`."""
        d = to_dict(self)
        for k in (*PROSE_FIELDS, "seed", "kind"):
            d.pop(k)
        d["pipeline"] = {"unit_size": self.pipeline.unit_size}
        cap, ed, im, fl = d["captions"], d["edits"], d["images"], d["filters"]
        for sec in (cap, ed):
            sec.get("llm", {}).pop("runtime", None)
        # In-process LLMs batch prompts together, and a prompt's logits (so its sampled text)
        # depend on the batch it shares (padding, kernel shapes): the batch sizes decide records.
        # A server (openai) batches as it likes, whatever we send; keywords/rules have no model.
        backends = {self.edits.backend, self.captions.llm_backend if self.captions.source == "llm" else ""}
        if backends & {"transformers", "vllm"}:
            d["pipeline"]["batch_size"] = self.pipeline.batch_size
        for sec, backend, llm in ((cap, self.captions.llm_backend, self.captions.llm),
                                  (ed, self.edits.backend, self.edits.llm)):
            if backend == "transformers" and "llm" in sec:
                sec["llm"]["runtime"] = {"batch_size": llm.runtime.batch_size}
        if self.captions.source != "llm":
            for k in ("llm", "llm_backend", "topics", "topics_file"):
                cap.pop(k, None)
        if self.captions.source == "shapes":
            for k in ("path", "column", "split", "bad_rows", "max_words", "dedup", "near_threshold",
                      "order", "reserve"):
                cap.pop(k, None)
        if self.edits.backend in ("rules", "keywords"):
            for k in ("llm", "examples_file"):
                ed.pop(k, None)
        if self.images.backend == "shapes":
            im.pop("diffusion", None)
        else:
            im["diffusion"].pop("device", None)
        for name in ("clip", "contamination", "dedupe"):
            if not fl[name]["enabled"]:
                fl[name] = {"enabled": False}
        fl["clip"].pop("device", None)
        fl["clip"].pop("batch_size", None)
        fl["contamination"].pop("cache_dir", None)
        return d

    def hash(self) -> str:
        """16 hex digits of SHA-256 over `identity()` (`stable_hash`): equal hashes, same records."""
        return stable_hash(self.identity())


def load_gen_recipe(name_or_path: str = "shapes-high", overrides: list[str] | None = None) -> GenRecipe:
    """A `GenRecipe` from a shipped name (`recipes/gen/`) or a YAML path, with `key.path=value` overrides.

    Raises ConfigError for a missing recipe, malformed YAML, a `kind` other than gen, an unknown key or
    wrong type, or a value `validate()` refuses (the message names the file and the dotted key)."""
    path = resolve_recipe_path(name_or_path, "gen")
    kind = read_yaml(path).get("kind", "gen")
    if kind != "gen":
        raise ConfigError(f"{path}: kind is {kind!r}, expected 'gen'")
    return load_recipe(GenRecipe, name_or_path, "gen", overrides)
