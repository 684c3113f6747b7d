"""Run a model through a benchmark: load, check images, encode, rank, score, write server files.

The harness consumes any object with the `RetrievalModel` interface (the CLIP baselines in
`baselines`, the trained models of `cir.model`). It builds the query texts from the protocol,
ranks by cosine similarity with a chunked running top-k, and returns an `EvalResult` whose
`table()` prints the protocol next to the numbers. It refuses to score an incomplete benchmark
unless asked to drop what is missing, and then says what it dropped.
"""
from __future__ import annotations

import csv
import io
import json
import time
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from datagen.base.device import resolve_device
from datagen.base.errors import CirgenError
from datagen.base.io import write_atomic

from . import EvalError
from . import metrics as M

from .benchmarks import (Benchmark, CheckLevel, Task, drop_bad_images, drop_queries, find_bad_images,
                         integrity_error, load_benchmark, query_text_problems)
from .protocol import Protocol, circo_text

if TYPE_CHECKING:
    from cir.prompts import QueryPrompt


@typing.runtime_checkable
class RetrievalModel(typing.Protocol):
    """What the harness needs from a model. Features are L2-normalised rows."""
    name: str
    cache_key: str          # identifies weights + preprocessing; recorded as the backbone

    def encode_images(self, paths: list[Path]) -> torch.Tensor:
        """[N, D] gallery features (the model owns batching and feature caching)."""
        ...

    def encode_queries(self, ref_paths: list[Path], prompts: list[str]) -> torch.Tensor:
        """[Q, D] composed-query features, one per (reference path, prompt); each prompt is a
        `QueryPrompt` (the pseudo-word's position kept apart from the text) or, under template
        "none", a plain string (`Protocol.prompt`)."""
        ...

    def prompt_problems(self, prompts: list[str]) -> dict[int, str]:
        """{index: why} for prompts the model cannot encode as written (e.g. the placeholder cut
        off by the text context length); {} for models without a placeholder."""
        ...


@dataclass
class EvalOptions:
    """Harness settings that are not protocol choices (they do not change the numbers)."""
    allow_missing: bool = False            # same as protocol missing=drop
    check: CheckLevel = "header"           # image integrity check depth
    query_batch: int = 256                 # prompts per encode_queries call
    query_chunk: int = 1024                # ranking block: queries x gallery rows
    gallery_chunk: int = 32768
    submission: Path | None = None         # folder for test-server files
    keep_rankings: bool = False
    device: str = "cpu"                    # where queries x gallery are ranked (the CLI: the model's)


@dataclass
class EvalResult:
    """What `evaluate` returns: metrics in percent by name (`R@10`, `Rs@1`, `mAP@10`, `mAP@10_<aspect>`,
    FashionIQ `<category>_R@10`, `avg`), gallery size per task, integrity report, seconds per phase."""
    dataset: str
    split: str
    model: str
    protocol: Protocol
    metrics: dict[str, float]
    n_queries: int
    gallery_size: dict[str, int]
    integrity: dict
    submission: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rankings: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        """The protocol line for this result's dataset (`Protocol.describe`)."""
        return self.protocol.describe(self.dataset)

    def to_dict(self) -> dict:
        """results.json's object: metrics (percent) rounded to 4 decimals, seconds to 3; rankings left out."""
        return {"dataset": self.dataset, "split": self.split, "model": self.model,
                "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
                "n_queries": self.n_queries, "gallery_size": self.gallery_size,
                "protocol": self.protocol.to_dict(), "protocol_line": self.describe(),
                "integrity": self.integrity, "submission": self.submission,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "notes": self.notes}

    def table(self) -> str:
        """What the CLI prints: the header, the protocol line, integrity notes, the metrics (percent,
        2 decimals; FashionIQ as a category grid) and the submission files."""
        gal = ", ".join(f"{k} {v}" for k, v in self.gallery_size.items())
        lines = [f"{self.dataset} {self.split} | model {self.model} | {self.n_queries} queries | gallery {gal}",
                 self.describe()]
        integ = self.integrity
        if integ.get("bad_images"):
            lines.append(f"integrity: {integ['bad_images']} bad images; {integ['queries_dropped']} of "
                         f"{integ['queries_total']} queries dropped, {integ['queries_changed']} changed "
                         f"({integ['handling']})")
        if integ.get("queries_unusable"):
            lines.append(f"integrity: {integ['queries_unusable']} queries dropped whose text cannot be "
                         f"encoded (first: {'; '.join(integ['unusable_examples'][:3])})")
        lines += self.notes
        lines.append(_metric_table(self.dataset, self.metrics))
        lines += [f"submission: {p}" for p in self.submission]
        return "\n".join(lines)


def _metric_table(dataset: str, m: dict[str, float]) -> str:
    if not m:
        return "(no metrics: unlabelled split)"
    if dataset.removeprefix("shapes-") == "fashioniq":
        cats = [k[:-5] for k in m if k.endswith("_R@10") and not k.startswith("avg")]
        rows = [["", "R@10", "R@50"]] + [[c, f"{m[c + '_R@10']:.2f}", f"{m[c + '_R@50']:.2f}"] for c in cats]
        rows += [["average", f"{m['avg_R@10']:.2f}", f"{m['avg_R@50']:.2f}"], ["mean of both", f"{m['avg']:.2f}", ""]]
        return _grid(rows)
    main = [k for k in m if "_" not in k]
    out = _grid([main, [f"{m[k]:.2f}" for k in main]])
    aspects = [k for k in m if k.startswith("mAP@10_")]
    if aspects:
        out += "\nmAP@10 per semantic aspect:\n" + _grid(
            [[k.removeprefix("mAP@10_") for k in aspects], [f"{m[k]:.2f}" for k in aspects]])
    return out


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


# ----------------------------------------------------------------------------- query text

def _strip(c: str) -> str:
    return c.strip(".?, ")


def query_prompts(kind: str, task: Task, protocol: Protocol) -> list[list["QueryPrompt | str"]]:
    """The prompt(s) of each query; FashionIQ `both` gives two per query (features averaged)."""
    out = []
    for q in task.queries:
        if kind == "fashioniq":
            c1, c2 = (_strip(c) for c in q.captions) if protocol.fiq_strip else q.captions
            bodies = {"c1c2": [f"{c1} and {c2}"], "c2c1": [f"{c2} and {c1}"],
                      "both": [f"{c1} and {c2}", f"{c2} and {c1}"]}[protocol.fiq_order]
        elif kind == "circo":
            # str.replace, not str.format: captions may contain braces.
            body = circo_text(protocol.circo_text).replace("{relative_caption}", q.captions[0])
            bodies = [body.replace("{shared_concept}", q.shared_concept)]
        else:
            bodies = [q.captions[0]]
        out.append([protocol.prompt(b, kind) for b in bodies])
    return out


def _check_features(x: torch.Tensor, n: int, what: str, model: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise EvalError(f"model {model}: {what} returned {shape}, expected [{n}, D]")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise EvalError(f"model {model}: {what} returned non-finite features")
    # Cosine similarity: re-normalise defensively (idempotent for already-normalised features).
    return torch.nn.functional.normalize(x, dim=1)


@torch.no_grad()
def encode_queries(model: RetrievalModel, task: Task, prompts: list[list[str]], batch: int) -> torch.Tensor:
    """One feature per query: multi-prompt queries are the renormalised mean of their prompts
    (FashionIQ `both`, as SEARLE's released code). `batch`: prompts per `model.encode_queries` call.

    Returns [Q, D] float32 L2-normalised rows on the CPU, Q = len(task.queries) ([0, 0] when there
    are no prompts). Raises EvalError when the model returns features not of shape [n, D] or non-finite."""
    flat_refs, flat_prompts, owner = [], [], []
    for i, (q, ps) in enumerate(zip(task.queries, prompts)):
        for p in ps:
            flat_refs.append(task.paths[q.reference])
            flat_prompts.append(p)
            owner.append(i)
    feats = []
    for s in range(0, len(flat_prompts), batch):
        f = model.encode_queries(flat_refs[s:s + batch], flat_prompts[s:s + batch])
        feats.append(_check_features(f, len(flat_prompts[s:s + batch]), "encode_queries", model.name))
    if not feats:
        return torch.empty(0, 0)
    flat = torch.cat(feats)
    summed = torch.zeros(len(task.queries), flat.shape[1]).index_add_(0, torch.tensor(owner), flat)
    return torch.nn.functional.normalize(summed, dim=1)


# ----------------------------------------------------------------------------- evaluation

def evaluate(model: RetrievalModel, dataset: str, root: str | Path, split: str = "val",
             protocol: Protocol | None = None, options: EvalOptions | None = None,
             log: Callable[[str], None] = lambda s: None, bench: Benchmark | None = None) -> EvalResult:
    """Evaluate `model` on `dataset` (`fashioniq`, `cirr`, `circo` or their `shapes-` versions) at
    `root` under `protocol`; return an `EvalResult` (metrics in percent, see `metrics.py` for the
    published definitions of Recall@K, Recall_subset@K and mAP@K).

    `bench`: the benchmark already read by `load_benchmark(dataset, root, split, protocol)` (the
    CLI reads it before loading the model, so annotation errors come first); None reads it here.
    Errors: `EvalError` (one line) for a bad protocol or split, an unlabelled split without a
    submission folder, bad images or unencodable queries unless `missing="drop"`, and features of
    the wrong shape; `DeviceError` for a device this machine lacks, before any work. Also EvalError
    for a model whose `preprocess_mode` differs from `protocol.preprocess` and when no query is left."""
    options = options or EvalOptions()
    # 1. Check the request before reading anything: device, protocol, split.
    resolve_device(options.device)         # a GPU this machine lacks: DeviceError now, not mid-ranking
    kind, split, protocol = _resolve_protocol(model, dataset, split, protocol or Protocol(), options)
    t0 = time.perf_counter()
    # 2. Read the benchmark and check this split can be evaluated as asked.
    if bench is None:
        bench = load_benchmark(dataset, root, split, protocol)
    _check_evaluable(dataset, kind, bench, protocol, options)
    # 3. Integrity: unreadable images and queries the model cannot encode are refused or dropped.
    bench, integrity = _check_integrity(model, kind, bench, protocol, options, log)
    seconds = {"load": time.perf_counter() - t0}
    if not any(t.queries for t in bench.tasks):
        raise EvalError(f"{dataset} {bench.split}: no queries to evaluate")
    # 4. Per task: encode the gallery and the composed queries, rank, score, write server files.
    metrics: dict[str, float] = {}
    per_cat: dict[str, dict[int, float]] = {}
    rankings: dict[str, list[str]] = {}
    files: list[str] = []
    notes = list(bench.notes)
    for task in bench.tasks:
        if not task.queries:
            notes.append(f"{task.annotation.name}: no queries, {task.name} left out of the averages")
            continue
        ranked, subsets = _rank_task(model, kind, task, protocol, options, seconds, log)
        rankings.update(ranked)
        if bench.labelled:
            m = _score(kind, task, ranked, subsets, protocol)
            if kind == "fashioniq":
                per_cat[task.name] = m
            else:
                metrics.update(m)
        if options.submission is not None and kind in ("cirr", "circo"):
            files += _write_submission(kind, f"{dataset}_{bench.split}", task, ranked, subsets,
                                       options.submission)
    # 5. FashionIQ reports per category and their average (the published summary).
    if per_cat:
        metrics = M.fiq_summary(per_cat)
    return EvalResult(dataset, bench.split, model.name, protocol, metrics,
                      sum(len(t.queries) for t in bench.tasks),
                      {t.name: len(t.gallery) for t in bench.tasks}, integrity, files, seconds,
                      notes, rankings if options.keep_rankings else {})


def _resolve_protocol(model: RetrievalModel, dataset: str, split: str, protocol: Protocol,
                      options: EvalOptions) -> tuple[str, str, Protocol]:
    """(benchmark kind, split, the protocol this run uses); EvalError for a bad protocol, a bad
    split or a model whose preprocessing differs from the protocol's."""
    try:
        protocol.validate()
    except ValueError as e:
        raise EvalError(f"protocol: {e}") from None
    kind = dataset.removeprefix("shapes-")
    if split not in ("val", "test", "test1"):
        raise EvalError(f"split {split!r}: expected val or test")
    split = "test" if split == "test1" else split     # CIRR's loader maps test -> test1
    if options.allow_missing:
        protocol = replace(protocol, missing="drop")
    protocol = replace(protocol, split="val" if split == "val" else "test",
                       backbone=protocol.backbone or model.cache_key)
    used = getattr(model, "preprocess_mode", None)
    if used is not None and used != protocol.preprocess:
        raise EvalError(f"model {model.name} preprocesses with {used!r} but the protocol says "
                        f"{protocol.preprocess!r}: set preprocess={used} or rebuild the model")
    return kind, split, protocol


def _check_evaluable(dataset: str, kind: str, bench: Benchmark, protocol: Protocol, options: EvalOptions) -> None:
    """EvalError when the split has no targets and nothing can be written for a server instead."""
    if not bench.labelled and kind == "fashioniq":
        raise EvalError("FashionIQ test has no targets and no public server: evaluate on val")
    if not bench.labelled and options.submission is None:
        raise EvalError(f"{dataset} {bench.split} has no targets: pass a submission folder "
                        "(--submission DIR) to write the test-server file(s)")
    if options.submission is not None and kind == "cirr" and protocol.cirr_gallery != "split":
        raise EvalError("CIRR server files rank the split gallery: use cirr_gallery=split for a submission")


def _check_integrity(model: RetrievalModel, kind: str, bench: Benchmark, protocol: Protocol,
                     options: EvalOptions, log: Callable[[str], None]) -> tuple[Benchmark, dict]:
    """The benchmark without bad images and unencodable queries (dropped and counted when
    `protocol.missing == "drop"`, else EvalError naming them), and the integrity report."""
    bad = find_bad_images(bench, options.check)
    integrity = {"bad_images": 0, "check": options.check}
    if bad:
        if protocol.missing != "drop":
            raise integrity_error(bench, bad)
        bench, report = drop_bad_images(bench, bad)
        integrity.update(report)
        log(f"integrity: {report['bad_images']} bad images, {report['queries_dropped']} queries dropped")
    text_problems = query_problems(model, kind, bench, protocol)
    if text_problems:
        bench, report = drop_queries(bench, text_problems, protocol.missing == "drop")
        integrity.update(report)
        log(f"integrity: {report['queries_unusable']} queries dropped whose text cannot be encoded")
    return bench, integrity


def query_problems(model: RetrievalModel, kind: str, bench: Benchmark, protocol: Protocol) -> dict[tuple[str, str], str]:
    """{(task name, query id): why} for every query that cannot be encoded as the protocol writes
    it: no caption text, or a prompt the model refuses (`prompt_problems`: e.g. the placeholder cut
    off by the text context length)."""
    problems = query_text_problems(bench)
    for task in bench.tasks:
        prompts = query_prompts(kind, task, protocol)
        flat = [(q, p) for q, ps in zip(task.queries, prompts) for p in ps]
        for i, why in model.prompt_problems([p for _, p in flat]).items():
            problems.setdefault((task.name, flat[i][0].qid), why)
    return problems


def _rank_task(model: RetrievalModel, kind: str, task: Task, protocol: Protocol, options: EvalOptions,
               seconds: dict, log) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    try:
        return _rank_task_inner(model, kind, task, protocol, options, seconds, log)
    except EvalError:
        raise
    except CirgenError as e:
        # An image the integrity check passed failed when the model read it (a corrupt file whose
        # header and end look fine): one line, with the way to find and drop every such file.
        if options.check == "decode":
            raise EvalError(str(e)) from None
        raise EvalError(f"{e} (the --check {options.check} integrity check did not catch it: rerun "
                        "with --check decode to find every unreadable image, and --allow-missing to "
                        "drop the queries that need them)") from None


def _rank_task_inner(model: RetrievalModel, kind: str, task: Task, protocol: Protocol, options: EvalOptions,
                     seconds: dict, log) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    t = time.perf_counter()
    log(f"{task.name}: encoding {len(task.gallery)} gallery images")
    gal = _check_features(model.encode_images([task.paths[g] for g in task.gallery]),
                          len(task.gallery), "encode_images", model.name)
    seconds[f"{task.name}_gallery"] = time.perf_counter() - t
    t = time.perf_counter()
    log(f"{task.name}: encoding {len(task.queries)} queries")
    qf = encode_queries(model, task, query_prompts(kind, task, protocol), options.query_batch)
    if qf.shape[1] != gal.shape[1]:
        raise EvalError(f"model {model.name}: query features are {qf.shape[1]}-d, gallery {gal.shape[1]}-d")
    seconds[f"{task.name}_queries"] = time.perf_counter() - t
    t = time.perf_counter()
    index = {g: i for i, g in enumerate(task.gallery)}
    remove = (kind == "cirr" and protocol.cirr_remove_reference) or \
             (kind == "circo" and protocol.circo_reference == "mask")
    exclude = torch.tensor([index.get(q.reference, -1) for q in task.queries]) if remove else None
    dev = resolve_device(options.device)
    top = M.topk_chunked(qf.to(dev), gal.to(dev), protocol.depth, None if exclude is None else exclude.to(dev),
                         options.query_chunk, options.gallery_chunk).cpu()
    ranked = {q.qid: [task.gallery[j] for j in row] for q, row in zip(task.queries, top.tolist())}
    subsets = {}
    if kind == "cirr":
        # Recall_subset: members minus the reference, ordered as the full ranking orders them.
        for i, q in enumerate(task.queries):
            idx = [index[m] for m in dict.fromkeys(q.members) if m != q.reference and m in index]
            subsets[q.qid] = [task.gallery[j] for j in M.subset_ranking(qf[i], gal, idx)]
    seconds[f"{task.name}_rank"] = time.perf_counter() - t
    return ranked, subsets


def _score(kind: str, task: Task, ranked: dict, subsets: dict, protocol: Protocol) -> dict:
    qs = task.queries
    rank = [ranked[q.qid] for q in qs]
    targets = [q.target for q in qs]
    if kind == "fashioniq":
        return M.recall_at_k(rank, targets, M.FIQ_KS)
    if kind == "cirr":
        r = M.recall_at_k(rank, targets, M.CIRR_KS)
        # Convention: a target outside img_set.members is a Recall_subset miss (it cannot be in
        # the subset ranking), so such queries still count in the denominator.
        rs = M.recall_at_k([subsets[q.qid] for q in qs], targets, M.CIRR_SUBSET_KS)
        out = {f"R@{k}": v for k, v in r.items()} | {f"Rs@{k}": v for k, v in rs.items()}
        out["avg"] = M.cirr_summary(r, rs, protocol.cirr_summary)
        return out
    gts = [q.gt for q in qs]
    out = {f"mAP@{k}": v for k, v in M.map_at_k(rank, gts, M.CIRCO_KS).items()}
    out |= {f"R@{k}": v for k, v in M.recall_at_k(rank, targets, M.CIRCO_KS).items()}
    out |= {f"mAP@10_{a}": v for a, v in M.map_per_aspect(rank, gts, [q.aspects for q in qs], 10).items()}
    return out


def _write_submission(kind: str, name: str, task: Task, ranked: dict, subsets: dict,
                      out_dir: Path) -> list[str]:
    from .submission import write_circo_submission, write_cirr_submission

    name = name.replace("-", "_")         # e.g. cirr_test1, shapes_circo_val
    if kind == "cirr":
        paths = write_cirr_submission(out_dir, task, ranked, subsets, name)
    else:
        paths = [write_circo_submission(Path(out_dir) / f"{name}.json", task, ranked)]
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------- results files

def write_results(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """`results.json` (everything but rankings) and `results.csv` (one row per metric, percent, 4 decimals),
    written atomically into `out_dir` (created if absent: a plain OSError when it cannot be). Raises
    MachineError when a file cannot be written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "split", "model", "metric", "value", "n_queries", "protocol"])
    for k, v in result.metrics.items():
        w.writerow([result.dataset, result.split, result.model, k, f"{v:.4f}", result.n_queries,
                    result.describe()])
    written = []
    for name, text in (("results.json", json.dumps(result.to_dict(), indent=2)), ("results.csv", buf.getvalue())):
        path = out_dir / name
        write_atomic(path, text)
        written.append(path)
    return written
