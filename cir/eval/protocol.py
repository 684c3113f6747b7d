"""Every protocol choice that differs between published ZS-CIR evaluations (CIRR: Liu et al., ICCV 2021;
CIRCO: Baldrati et al., ICCV 2023; FashionIQ: Wu et al., CVPR 2021; and the released code of SEARLE,
LinCIR, CompoDiff and TSCIR).

One `Protocol` travels with each evaluation; `describe()` is printed next to every number so a
result always says how it was obtained. Defaults are the common choice (SEARLE/LinCIR), except
where marked: the prompt template and FashionIQ's caption order follow the released TSCIR
evaluation (`test_*_stage2.sh`). Change a choice with `--set key=value` (or `protocol.key=value`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cir.prompts import QueryPrompt

# Named prompt templates; `*` is the pseudo-word placeholder (TSCIR's and Pic2Word's; `$`, SEARLE's,
# is accepted in a template too). The placeholder is the template's position, so a `*` or `$` in
# a caption stays text (cir/prompts.py). Any other string containing `{}` is a custom template.
TEMPLATES = {
    "that": "a photo of * that {}",            # SEARLE, LinCIR; TSCIR on CIRCO
    "comma-that": "a photo of * , that {}",    # TSCIR on CIRR and FashionIQ (test_*_stage2.sh)
    "pic2word": "a photo of * , {}",           # Pic2Word, Context-I2W
    "none": "{}",                              # MagicLens, CoVR, CIReVL (no pseudo-word)
}
# `template: auto` = the released TSCIR evaluation prompt of each benchmark.
AUTO_TEMPLATES = {"cirr": "comma-that", "fashioniq": "comma-that", "circo": "that"}
# CIRCO query text bodies (before the template is applied).
CIRCO_TEXTS = {
    "relative": "{relative_caption}",                               # SEARLE, LinCIR, CIReVL
    "shared": "{shared_concept} but {relative_caption}",            # shared concept, template-friendly
    "magiclens": "find {shared_concept} but {relative_caption}",    # MagicLens (use template=none)
}


@dataclass
class Protocol:
    """The `protocol` of an evaluation: one field per choice that differs between published evaluations (the comments carry its
    numbers); built by `build_protocol` and recorded with every result (`describe`, `to_dict`)."""
    # 1. FashionIQ caption joining: order of the two captions and whether they are stripped.
    fiq_order: Literal["c1c2", "c2c1", "both"] = "c2c1"   # TSCIR/Pic2Word: one pass, c2 first; both = two
                                                         # passes, features averaged (SEARLE)
    fiq_strip: bool = True                               # strip surrounding `.?,` and spaces (SEARLE)
    # 12. Prompt template: `auto` (TSCIR's per benchmark), a name in TEMPLATES or a string with `{}`.
    template: str = "auto"
    # 2. FashionIQ image extension (auto: per image, the folder's majority first) and what to do
    #    with missing or unreadable images.
    fiq_ext: Literal["auto", "jpg", "png"] = "auto"
    missing: Literal["fail", "drop"] = "fail"           # drop = Pic2Word (reported, never silent)
    # 3./4. CIRR gallery scope and reference removal.
    cirr_gallery: Literal["split", "all"] = "split"
    cirr_remove_reference: bool = True
    # 5. CIRR single-number summary: (R@5+Rs@1)/2 (common) or (R@1+Rs@1)/2 (CompoDiff).
    cirr_summary: Literal["r5", "r1"] = "r5"
    # 6./7./8. CIRCO query text, reference image handling and ranking depth.
    circo_text: str = "relative"
    circo_reference: Literal["keep", "mask"] = "keep"
    depth: int = 50
    # 9./10./11. Preprocessing, backbone and tokeniser: owned by the model, recorded here.
    preprocess: Literal["clip", "targetpad"] = "clip"
    target_ratio: float = 1.25
    backbone: str = ""                                   # filled from the model's cache_key
    tokenizer: str = "open_clip"
    # 13. Checkpoint selection. Ours: a held-out synthetic split (benchmark val leaks signal).
    selection: Literal["synthetic", "benchmark-val", "none"] = "synthetic"
    # 14. Split reported.
    split: Literal["val", "test"] = "val"

    def validate(self) -> None:
        """Raise ValueError for a `template` or `circo_text` that `template_text` / `circo_text` refuse, a
        `depth` outside 50..1000 (the CIRR and CIRCO evaluation servers read the top 50) or a
        `target_ratio` below 1; `from_dict` turns it into a ConfigError."""
        template_text(self.template)
        circo_text(self.circo_text)
        if not 50 <= self.depth <= 1000:
            raise ValueError(f"depth must be in 50..1000 (servers read the top 50), got {self.depth}")
        if self.target_ratio < 1:
            raise ValueError(f"target_ratio must be >= 1, got {self.target_ratio}")

    def template_for(self, dataset: str | None = None) -> str:
        """The template text used for `dataset` (`auto` resolves per benchmark as the TSCIR released code's
        `test_*_stage2.sh`, github.com/LiJiaBei-7/TSCIR; CIRR's without one). ValueError as `template_text`."""
        name = self.template
        if name == "auto":
            name = AUTO_TEMPLATES.get(_kind(dataset) or "cirr", "that")
        return template_text(name)

    def prompt(self, body: str, dataset: str | None = None) -> "QueryPrompt | str":
        """The query text for `body`: a QueryPrompt (placeholder position kept apart from the
        text) or, for a template without a placeholder (`none`), the plain string. Raises PromptError
        when the template has more than one placeholder before its `{}`, ValueError as `template_text`."""
        from cir.prompts import PromptError, fill_template

        template = self.template_for(dataset)
        try:
            return fill_template(template, body)
        except PromptError:
            if any(p in template.split("{}")[0] for p in ("*", "$")):
                raise
            return template.replace("{}", body)

    def summary_name(self) -> str:
        """The CIRR single-number summary's name: (R@5+Rs@1)/2, the common one, or (R@1+Rs@1)/2,
        CompoDiff's (Gu et al., 2024)."""
        return "(R@5+Rs@1)/2" if self.cirr_summary == "r5" else "(R@1+Rs@1)/2"

    def describe(self, dataset: str | None = None) -> str:
        """One line with the choices that matter for `dataset` (all of them when None)."""
        kind = _kind(dataset)
        parts = [f"split={self.split}", f"template='{self.template_for(dataset)}'", f"missing={self.missing}"]
        if kind in (None, "fashioniq"):
            order = {"c1c2": "c1 and c2", "c2c1": "c2 and c1", "both": "c1c2+c2c1 averaged"}[self.fiq_order]
            parts += [f"fiq_order={order}", f"fiq_strip={self.fiq_strip}", f"fiq_ext={self.fiq_ext}"]
        if kind in (None, "cirr"):
            parts += [f"cirr_gallery={self.cirr_gallery}",
                      f"reference={'removed' if self.cirr_remove_reference else 'kept'}",
                      f"avg={self.summary_name()}"]
        if kind in (None, "circo"):
            parts += [f"circo_text='{circo_text(self.circo_text)}'", f"circo_reference={self.circo_reference}",
                      f"depth={self.depth}", "mAP denominator=min(K,#GT)"]
        pre = self.preprocess + (f"({self.target_ratio})" if self.preprocess == "targetpad" else "")
        parts += [f"preprocess={pre}", f"tokenizer={self.tokenizer}", f"backbone={self.backbone or '?'}",
                  f"selection={self.selection}"]
        return "protocol: " + ", ".join(parts)

    def to_dict(self) -> dict:
        """Every choice as a plain dict (the `protocol` entry of results.json)."""
        return asdict(self)


def _kind(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    return dataset.removeprefix("shapes-")


def template_text(template: str) -> str:
    """The template string for a name in `TEMPLATES` or a custom template (`auto` is returned as is:
    `Protocol.template_for` resolves it). Raises ValueError unless the text has exactly one `{}`."""
    if template == "auto":
        return template
    text = TEMPLATES.get(template, template)
    if text.count("{}") != 1:
        raise ValueError(f"template {template!r}: expected one of {sorted(TEMPLATES)} or a string "
                         "with exactly one '{}'")
    return text


def circo_text(name: str) -> str:
    """The CIRCO query body for a name in `CIRCO_TEXTS` (the published query formats) or a custom format string.
    Raises ValueError unless the text contains `{relative_caption}`."""
    text = CIRCO_TEXTS.get(name, name)
    if "{relative_caption}" not in text:
        raise ValueError(f"circo_text {name!r}: expected one of {sorted(CIRCO_TEXTS)} or a format "
                         "string containing {relative_caption}")
    return text


def build_protocol(overrides: list[str] | tuple[str, ...] = (), base: Protocol | None = None) -> Protocol:
    """Protocol from `key=value` overrides (an optional `protocol.` prefix is accepted) on `base` (default:
    `Protocol()`). `template`, `circo_text`, `backbone` and `tokenizer` are kept verbatim, the others parsed
    as YAML. Raises ConfigError for an item without `=`, an unknown key, a wrong type or a value
    `Protocol.validate` refuses."""
    from datagen.base.config import ConfigError, apply_overrides, from_dict

    data = asdict(base or Protocol())
    known = {f.name for f in fields(Protocol)}
    cleaned = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("protocol.")
        if not sep:
            raise ConfigError(f"--set {item!r} is not of the form key=value")
        if key not in known:
            raise ConfigError(f"--set {item!r}: unknown protocol key {key!r} "
                              f"(known: {', '.join(sorted(known))})")
        if key in ("template", "circo_text", "backbone", "tokenizer"):
            # Free text: keep it verbatim instead of parsing it as YAML (`a, b` or `{}` would break).
            data[key] = value
            continue
        cleaned.append(f"{key}={value}")
    apply_overrides(data, cleaned)
    return from_dict(Protocol, data, "protocol")
