"""The statistics of a generation run, typed: `UnitStats` (one work unit, stored in its shards'
parquet footers under the `cirgen` key) and `DatasetStats` (the whole dataset: stats.json).

Both are built here and only here; everything else (the dataset card, `cirgen inspect`, the
report, the CLI summary) reads their fields. `to_dict()`/`from_dict()` give exactly the keys the
files hold, so datasets written before these classes existed read the same.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .candidate import Candidate
from .schema import STAGES


def _counts(d: Mapping | None) -> dict[str, int]:
    return {str(k): int(v) for k, v in (d or {}).items()}


def _add(total: dict[str, int], part: Mapping[str, int]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


COUNTS = ("rejected", "failures_kept", "failures_generated", "edit_types", "passes")


@dataclass(kw_only=True)
class Counts:
    """What a unit and a whole dataset both count, over every candidate generated (kept or not).

    `rejected`: candidates per reject reason; `failures_kept`/`failures_generated`: per injected
    failure label (`none` = no failure); `edit_types`: kept per edit type; `passes`: candidates
    that passed each `pass_*` criterion."""
    kept: int = 0
    generated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failures_kept: dict[str, int] = field(default_factory=dict)
    failures_generated: dict[str, int] = field(default_factory=dict)
    edit_types: dict[str, int] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)

    def _counts_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "generated": self.generated, **{k: dict(getattr(self, k)) for k in COUNTS}}

    @staticmethod
    def _counts_from(d: Mapping[str, Any], required: bool) -> dict[str, Any]:
        get = d.__getitem__ if required else (lambda k: d.get(k, 0 if k in ("kept", "generated") else None))
        return {"kept": int(get("kept")), "generated": int(get("generated")),
                **{k: _counts(get(k)) for k in COUNTS}}


@dataclass(kw_only=True)
class UnitStats(Counts):
    """Counts and seconds of one work unit (`seconds`: per stage, summed over its candidates)."""
    unit: int
    seed: int
    recipe_hash: str
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_candidates(cls, unit: int, seed: int, recipe_hash: str, kept: list[Candidate],
                        rejected: list[Candidate]) -> "UnitStats":
        """The statistics of a finished unit from its kept and rejected candidates."""
        every = kept + rejected
        passes: Counter = Counter()
        for c in every:
            for p, ok in c.passes.items():
                passes[p] += int(bool(ok))
        return cls(
            unit=unit, seed=seed, recipe_hash=recipe_hash, kept=len(kept), generated=len(every),
            rejected=dict(Counter(c.reject_reason for c in every if c.reject_reason)),
            failures_kept=dict(Counter(c.failure or "none" for c in kept)),
            failures_generated=dict(Counter(c.failure or "none" for c in every)),
            edit_types=dict(Counter(c.edit_type for c in kept)),
            passes=dict(passes),
            seconds={s: sum(c.seconds.get(s, 0.0) for c in every) for s in STAGES})

    def to_dict(self) -> dict[str, Any]:
        """The footer's JSON object (the keys every cirgen version wrote)."""
        return {"unit": self.unit, "seed": self.seed, "recipe_hash": self.recipe_hash, **self._counts_dict(),
                "seconds": dict(self.seconds)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnitStats":
        """From a footer's JSON object; KeyError/TypeError/ValueError when it is not one."""
        return cls(unit=int(d["unit"]), seed=int(d["seed"]), recipe_hash=str(d["recipe_hash"]),
                   **cls._counts_from(d, required=True), seconds={str(k): float(v) for k, v in d["seconds"].items()})


@dataclass
class Criterion:
    """One filter criterion over the candidates it scored: `pass_rate` (passed / evaluated, a fraction in
    [0, 1]) is None when it scored none."""
    evaluated: int
    passed: int
    pass_rate: float | None


# Budget maps: stage name (captions, edits, images, filters) -> seconds, or device name -> seconds.
PerStage = dict[str, float]
PerDevice = dict[str, float]


@dataclass
class Budget:
    """Where the seconds went: per stage, per generated and per kept triplet, per device.

    Seconds are wall-clock seconds summed over units (so over processes: more than the run's wall
    time with several workers); `device` joins the devices used with `+` (e.g. `cpu+cuda`)."""
    seconds_total: float = 0.0
    seconds_per_stage: PerStage = field(default_factory=dict)
    seconds_per_generated: float = 0.0
    seconds_per_kept: float = 0.0
    seconds_per_1k_kept: float = 0.0
    stage_seconds_per_generated: PerStage = field(default_factory=dict)
    stage_seconds_per_kept: PerStage = field(default_factory=dict)
    device_per_stage: dict[str, str] = field(default_factory=dict)   # stage -> device(s), `+`-joined
    seconds_by_device: PerDevice = field(default_factory=dict)
    gpu_seconds: float = 0.0
    gpu_seconds_per_1k_kept: float = 0.0
    device: str = "cpu"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Budget":
        """From stats.json's `budget` object (keys an older cirgen did not write keep their defaults)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(kw_only=True)
class DatasetStats(Counts):
    """stats.json: the sum of the units' statistics, pass rates per criterion, yield and budget.

    `criteria` counts each criterion over the candidates it scored; `pass_rates` is the older
    per-criterion rate (passed / candidates that criterion scored). `near_duplicates_cross_unit`
    is the dedupe filter's report across units when the recipe asks for it (None otherwise)."""
    criteria: dict[str, Criterion] = field(default_factory=dict)
    pass_rates: dict[str, float] = field(default_factory=dict)
    yield_: float = 0.0
    budget: Budget | None = None
    near_duplicates_cross_unit: dict | None = None
    caption_pool: dict | None = None      # caption sources that read a file: rows read, kept, dropped by reason

    @classmethod
    def from_units(cls, units: Iterable[tuple[UnitStats, dict[str, str]]],
                   criteria: Mapping[str, tuple[int, int]]) -> "DatasetStats":
        """Sum the units. Each unit comes with the device each stage ran on in it (one device per
        stage per unit: a unit runs in one process); `criteria` maps each `pass_*` column to
        (candidates evaluated, passed) over the whole dataset. Rates and `yield_` are fractions in
        [0, 1] rounded to 4 decimals; budget times are seconds (per-triplet ones divide by at least 1)."""
        total = cls()
        seconds = {s: 0.0 for s in STAGES}
        by_device: dict[str, float] = {}
        stage_devices: dict[str, set] = {s: set() for s in STAGES}
        for st, devices in units:
            total.kept += st.kept
            total.generated += st.generated
            for name in COUNTS:
                _add(getattr(total, name), getattr(st, name))
            for s in STAGES:
                sec = st.seconds.get(s, 0.0)
                seconds[s] += sec
                dev = devices.get(s, "cpu")
                stage_devices[s].add(dev)
                by_device[dev] = by_device.get(dev, 0.0) + sec
        sec = sum(seconds.values())
        gen, kept = max(total.generated, 1), max(total.kept, 1)
        total.criteria = {k.removeprefix("pass_"): Criterion(e, p, round(p / e, 4) if e else None)
                          for k, (e, p) in sorted(criteria.items())}
        # Pass rate of a criterion = passed / candidates it scored (= generated when nothing is
        # rejected before the filters, which is what older datasets without pass columns assume).
        total.pass_rates = {k: round(v / (criteria.get(k, (gen, 0))[0] or gen), 4)
                            for k, v in sorted(total.passes.items())}
        total.yield_ = round(total.kept / gen, 4)
        gpu = sum(v for d, v in by_device.items() if d != "cpu")
        total.budget = Budget(
            seconds_total=round(sec, 3),
            seconds_per_stage={s: round(v, 3) for s, v in seconds.items()},
            seconds_per_generated=round(sec / gen, 6),
            seconds_per_kept=round(sec / kept, 6),
            seconds_per_1k_kept=round(1000 * sec / kept, 3),
            stage_seconds_per_generated={s: round(v / gen, 6) for s, v in seconds.items()},
            stage_seconds_per_kept={s: round(v / kept, 6) for s, v in seconds.items()},
            device_per_stage={s: "+".join(sorted(d)) for s, d in stage_devices.items()},
            seconds_by_device={d: round(v, 3) for d, v in sorted(by_device.items())},
            gpu_seconds=round(gpu, 3),
            gpu_seconds_per_1k_kept=round(1000 * gpu / kept, 3),
            device="+".join(sorted({d for ds in stage_devices.values() for d in ds})) or "cpu")
        return total

    def to_dict(self) -> dict[str, Any]:
        """stats.json's object (the keys of every cirgen version; `yield` is a Python keyword)."""
        d: dict[str, Any] = {
            **self._counts_dict(),
            "criteria": {k: {"evaluated": c.evaluated, "passed": c.passed, "pass_rate": c.pass_rate}
                         for k, c in self.criteria.items()},
            "pass_rates": dict(self.pass_rates), "yield": self.yield_}
        if self.budget is not None:
            d["budget"] = {k: getattr(self.budget, k) for k in Budget.__dataclass_fields__}
        if self.near_duplicates_cross_unit is not None:
            d["near_duplicates_cross_unit"] = self.near_duplicates_cross_unit
        if self.caption_pool is not None:
            d["caption_pool"] = self.caption_pool
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DatasetStats":
        """From stats.json's object; fields an older cirgen did not write take their defaults.
        A value of the wrong type raises TypeError, ValueError or AttributeError."""
        budget = d.get("budget")
        return cls(
            **cls._counts_from(d, required=False),
            criteria={k: Criterion(v.get("evaluated", 0), v.get("passed", 0), v.get("pass_rate"))
                      for k, v in (d.get("criteria") or {}).items()},
            pass_rates=dict(d.get("pass_rates") or {}), yield_=float(d.get("yield", 0.0)),
            budget=Budget.from_dict(budget) if isinstance(budget, Mapping) else None,
            near_duplicates_cross_unit=d.get("near_duplicates_cross_unit"), caption_pool=d.get("caption_pool"))

    def summary_lines(self) -> list[str]:
        """What `cirgen triplets` prints after a run."""
        lines = [f"kept {self.kept} of {self.generated} candidates (yield {100 * self.yield_:.1f}%)"]
        if self.rejected:
            lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())))
        fk = {k: v for k, v in self.failures_kept.items() if k != "none"}
        if fk:
            lines.append("injected failures among kept: " + ", ".join(f"{k} {v}" for k, v in sorted(fk.items())))
        if self.criteria:
            lines.append("pass rate per criterion: " + ", ".join(
                f"{k} {100 * c.pass_rate:.1f}% of {c.evaluated}" for k, c in self.criteria.items() if c.evaluated))
        b = self.budget
        if b is not None:
            lines.append("seconds per stage: " + ", ".join(f"{s} {v:.2f}" for s, v in b.seconds_per_stage.items())
                         + f" | {b.seconds_per_1k_kept:.2f} s per 1k kept ({b.device})"
                         + (f", GPU {b.gpu_seconds_per_1k_kept:.2f} s per 1k kept" if b.gpu_seconds else ""))
        dup = self.near_duplicates_cross_unit
        if dup:
            lines.append(f"near-duplicates across units (listed in stats.json, not removed): {dup['count']}")
        if self.caption_pool:
            from .text.sources import pool_counts

            lines.append(f"caption pool {self.caption_pool['source']}: {pool_counts(self.caption_pool)}")
        return lines
