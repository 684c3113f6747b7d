"""`cirgen`: the command line. Thin: parse, load a recipe, call the library, print."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click


DEVICE_HELP = ("auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps; a named GPU "
               "this machine lacks is an error.")


class _Fail(click.ClickException):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _Group(click.Group):
    """The one place where a user-facing error (`CirgenError`) becomes `error: ...` and exit 1, and
    a bad argument (click's usage error: unknown option, wrong type) `error: ...` and exit 2."""

    def invoke(self, ctx):
        from datagen.base.errors import CirgenError

        try:
            return super().invoke(ctx)
        except CirgenError as e:
            raise _Fail(" ".join(str(e).split()) or type(e).__name__) from None
        except click.UsageError as e:        # one line too, instead of usage + hint + message
            if isinstance(e, _HELP):
                raise
            raise _one_line(e, ctx) from None

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:        # a bad option of `cirgen` itself
            if isinstance(e, _HELP):
                raise
            raise _one_line(e, ctx) from None


# click >= 8.2 shows a group's help for no arguments by raising this usage error: keep it as is.
_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(e: click.UsageError, ctx: click.Context) -> _Fail:
    where = e.ctx.command_path if e.ctx is not None else ctx.command_path
    fail = _Fail(f"{' '.join(e.format_message().split())} (see {where} --help)")
    fail.exit_code = e.exit_code
    return fail


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cirgen")
def main() -> None:
    """cirgen: synthetic triplets and two-stage training for zero-shot composed image retrieval."""


def _parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N) with 0 <= I < N (a real check: `python -O` drops asserts)."""
    parts = text.split("/")
    if len(parts) == 2 and all(p.strip().isdecimal() for p in parts):
        i, k = int(parts[0]), int(parts[1])
        if i < k:
            return i, k
    raise _Fail(f"--shard {text!r}: expected I/N with whole numbers 0 <= I < N, e.g. 0/4")


@main.command()
@click.option("--n", "n", type=int, required=True, help="Number of kept triplets the dataset should hold.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset folder (created, resumed or extended).")
@click.option("--recipe", default="shapes-high", show_default=True,
              help="Generation recipe: a name in recipes/gen/ or a YAML path.")
@click.option("--quality", type=click.Choice(["high", "low"]), default=None,
              help="Shortcut for --recipe shapes-high / shapes-low.")
@click.option("--seed", type=int, default=None, help="Seed (default: the recipe's).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes; 0 = one per CPU core (default: the recipe's pipeline.workers).")
@click.option("--shard", default=None, metavar="I/N", help="Run only work units u with u % N == I.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run work units on Ray actors (GPU actors for model stages); no ADDRESS = a local "
                   "instance. Needs the ray extra and a folder every node can write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def triplets(n, out, recipe, quality, seed, workers, shard, ray_address, overrides, as_json, quiet) -> None:
    """Generate (or resume, or extend) a dataset of N synthetic triplets."""
    from datagen.pipeline import generate, summary_lines
    from datagen.base.recipes import resolve_recipe_path
    from datagen.recipe import load_gen_recipe
    if quality is not None:
        if recipe != "shapes-high":
            raise _Fail("give either --recipe or --quality, not both")
        recipe = f"shapes-{quality}"
    if n <= 0:
        raise _Fail(f"--n must be a positive number of triplets, got {n}")
    shard_t = _parse_shard(shard) if shard is not None else None
    r = load_gen_recipe(recipe, list(overrides))
    path = str(resolve_recipe_path(recipe, "gen"))
    log = (lambda s: click.echo(s, err=True)) if not as_json else (lambda s: None)
    stats = generate(r, out, n, seed=seed, workers=workers, recipe_path=path,
                   progress=not quiet and not as_json, log=log, shard=shard_t, ray_address=ray_address)
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif stats:
        for line in summary_lines(stats):
            click.echo(line)


@main.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--examples", default=3, show_default=True, help="How many example triplets to show.")
def inspect(dataset, as_json, examples) -> None:
    """Counts, pass rates, budget, failure labels and a few examples of a triplet dataset."""
    from datagen.inspect import inspect_dataset, render_text

    report = inspect_dataset(dataset, examples)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else render_text(report))


@main.command("pretrain-clip")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help='Run folder for the weights, checkpoints and metrics.')
@click.option("--recipe", default="shapes-clip", show_default=True,
              help="A name in recipes/train/ or a YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help='Override a recipe value.')
def pretrain_clip(out, recipe, overrides) -> None:
    """Train shapes-CLIP from scratch on the shapes world (resumable: rerun to continue)."""
    from cir.shapes_clip import load_pretrain_recipe, pretrain

    cfg = load_pretrain_recipe(recipe, list(overrides))
    path = pretrain(cfg, out, log=lambda s: click.echo(s, err=True))
    click.echo(f"wrote {path}")


@main.command("eval-clip")
@click.option("--weights", default=None, help="Weights file (default: the shipped shapes-CLIP).")
@click.option("--model", "arch", default="shapes-clip", show_default=True,
              help="Architecture (a config in assets/shapes_clip/) the weights belong to.")
@click.option("--scenes", default=1000, show_default=True,
              help='Held-out scenes to retrieve.')
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True,
              help='Print the metrics as JSON.')
def eval_clip(weights, arch, scenes, device, as_json) -> None:
    """Measure shapes-CLIP on held-out scenes with held-out phrasing (retrieval and probes)."""
    from cir.shapes_clip import evaluate, pair_similarities
    from datagen.base.device import resolve_device
    from datagen.base.clip_loader import load_clip

    if arch != "shapes-clip" and weights is None:
        raise click.UsageError("--model other than shapes-clip needs --weights")
    clip = load_clip(arch, pretrained=weights, device=resolve_device(device))
    res = {"retrieval": evaluate(clip, n_scenes=scenes), "pairs": pair_similarities(clip)}
    click.echo(json.dumps(res, indent=2 if as_json else None, sort_keys=True))


@main.command()
@click.option("--recipe", default="stage1-shapes", show_default=True, help="A name in recipes/train/ or a YAML path.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--device", default=None, help=DEVICE_HELP + " Default: the recipe's clip.device (auto).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help='Override a recipe value (recipes/train/stage1-shapes.yaml shows every key).')
def stage1(recipe, out, resume, device, overrides) -> None:
    """Stage I: train the token learner (+ VSI) that maps an image to pseudo-word tokens."""
    from cir.stage1 import load_stage1_recipe, run_stage1

    r = load_stage1_recipe(recipe, list(overrides) + ([f"clip.device={device}"] if device else []))
    res = run_stage1(r, out, resume=resume, log=lambda s: click.echo(s, err=True))
    click.echo(json.dumps(res.get("eval", res.get("train")), sort_keys=True))


@main.command()
@click.argument("datasets", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder (created or updated); open OUT/index.html in a browser.")
@click.option("--no-rejects", is_flag=True, help="Leave out the rejected candidates (rejects/).")
@click.option("--thumb-size", default=128, show_default=True, help="Longest side of thumbnails, px.")
@click.option("--title", default=None, help="Report title.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def browse(datasets, out, no_rejects, thumb_size, title, as_json) -> None:
    """Static HTML report of triplet dataset(s): cards, filters, scores, charts (opens from disk)."""
    from datagen.report import write_dataset_report

    res = write_dataset_report(list(datasets), out, rejects=not no_rejects, thumb_size=thumb_size, title=title)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2, sort_keys=True))
        return
    click.echo(f"{res.rows} rows ({res.kept} kept, {res.rejected} rejected) in {res.seconds:.1f} s; "
               f"thumbnails: {res.thumbs_written} written, {res.thumbs_reused} reused"
               + (f", {res.images_unreadable} images unreadable" if res.images_unreadable else ""))
    click.echo(f"open {res.index_html.resolve().as_uri()}")


@main.command("eval")
@click.option("--model", "model_spec", required=True,
              help="image-only, text-only, sum (CLIP baselines) or a trained run folder.")
@click.option("--dataset", type=click.Choice(["fashioniq", "cirr", "circo", "shapes-cirr", "shapes-circo"]),
              required=True, help="Benchmark (shapes-*: one `cirgen benchmark shapes` wrote).")
@click.option("--root", type=click.Path(path_type=Path), required=True, help="Benchmark folder (official layout).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help='Benchmark split (test: only with --submission, no targets).')
@click.option("--submission", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for test-server files (required for test splits).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write results.json and results.csv here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--allow-missing", is_flag=True,
              help="Drop queries whose images are missing or unreadable (reported) instead of failing.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Protocol choice, e.g. --set fiq_order=c2c1 --set template=pic2word.")
@click.option("--clip", "clip_name", default="shapes-clip", show_default=True, help="CLIP for the baselines.")
@click.option("--weights", default=None, help="CLIP weights for the baselines: a file, a tag, or 'random'.")
@click.option("--check", type=click.Choice(["exists", "header", "decode"]), default="header", show_default=True,
              help="How deeply image files are checked before evaluating.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write an HTML report of every query's top-10 (hits marked) here.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
def eval_cmd(model_spec, dataset, root, split, submission, out_dir, as_json, allow_missing, overrides,
             clip_name, weights, check, report_dir, device) -> None:
    """Evaluate a model on FashionIQ, CIRR, CIRCO or a shapes benchmark (protocol printed with the numbers)."""
    from datagen.base.config import ConfigError
    from cir.eval import EvalError
    from cir.eval.benchmarks import load_benchmark
    from cir.eval.protocol import build_protocol

    log = (lambda s: None) if as_json else (lambda s: click.echo(s, err=True))
    try:
        protocol = build_protocol(list(overrides))
        # The annotations first (torch not yet imported): a bad entry, or a path that leaves the
        # root, is refused before the model loads and before any image is opened.
        bench = load_benchmark(dataset, root, split, protocol)
        from cir.eval.baselines import resolve_model
        from cir.eval.harness import EvalOptions, evaluate, write_results

        model = resolve_model(model_spec, clip_name, weights, protocol.preprocess, protocol.target_ratio,
                              device=device)
        result = evaluate(model, dataset, root, split, protocol,
                          EvalOptions(allow_missing=allow_missing, check=check, submission=submission,
                                      keep_rankings=report_dir is not None, device=device),
                          log=log, bench=bench)
        files = write_results(result, out_dir) if out_dir else []
        if report_dir is not None:
            from cir.eval.report import write_eval_report

            write_eval_report(result, root, report_dir)
            files.append(str(Path(report_dir) / "index.html"))
    except (EvalError, ConfigError) as e:
        raise _Fail(str(e)) from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(result.table())
    for f in files:
        click.echo(f"wrote {f}")


@main.group()
def benchmark() -> None:
    """Write benchmarks (the shapes-world CIRR and CIRCO lookalikes)."""


@benchmark.command("shapes")
@click.option("--format", "fmt", type=click.Choice(["cirr", "circo"]), required=True,
              help='Official layout to write (CIRR or CIRCO).')
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help='Benchmark folder to write.')
@click.option("--queries", type=int, default=1000, show_default=True, help="Queries per split.")
@click.option("--seed", type=int, default=0, show_default=True,
              help='Seed of the held-out scenes and edits.')
@click.option("--resolution", type=int, default=128, show_default=True,
              help='Image side in pixels.')
@click.option("--split", "splits", type=click.Choice(["val", "test"]), multiple=True,
              help="Splits to write (default: val; test has no targets, as on the servers).")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
def benchmark_shapes(fmt, out, queries, seed, resolution, splits, overwrite) -> None:
    """Held-out shapes scenes and phrasing in the exact CIRR or CIRCO layout."""
    from datagen.world.benchmark import write_shapes_benchmark

    summary = write_shapes_benchmark(out, fmt, queries, seed, resolution, tuple(splits) or ("val",), overwrite)
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option("--recipe", default="stage2-shapes", show_default=True, help="A name in recipes/train/ or a YAML path.")
@click.option("--triplets", type=click.Path(exists=True, path_type=Path), required=True,
              help="A cirgen dataset folder (or a TransAgg/CIRR JSON file with --set triplets.format=...).")
@click.option("--stage1", "stage1_run", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help='The stage-I run folder (what `cirgen stage1 --out` wrote).')
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--max-triplets", type=int, default=None, help="Deterministic subsample of N triplets.")
@click.option("--condition", "conditions", multiple=True, metavar="COND",
              help="Train only on rows that meet it (a stored column), e.g. 'failure==none' or "
                   "'score_clip_dir>=0.2' (datasets made with CLIP filters).")
@click.option("--resume", is_flag=True,
              help='Continue the run in --out from its last checkpoint (same recipe and stage-I run).')
@click.option("--device", default=None, help=DEVICE_HELP + " Default: the recipe's device (auto).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help='Override a recipe value (recipes/train/stage2-shapes.yaml shows every key).')
def stage2(recipe, triplets, stage1_run, out, max_triplets, conditions, resume, device, overrides) -> None:
    """Stage II: train composing adapters on self-made triplets with hard negatives."""
    from cir.stage2 import load_stage2_recipe, run_stage2

    sets = list(overrides) + [f"triplets.path={triplets}"] + ([f"device={device}"] if device else [])
    if max_triplets is not None:
        sets.append(f"triplets.max_triplets={max_triplets}")
    r = load_stage2_recipe(recipe, sets)
    if conditions:
        r.triplets.conditions = list(r.triplets.conditions) + list(conditions)
    res = run_stage2(r, stage1_run, out, resume=resume, log=lambda s: click.echo(s, err=True))
    click.echo(json.dumps(res, sort_keys=True, default=str))


@main.command()
@click.argument("recipe", default="shapes")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Study folder.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Dotted override, e.g. --set quantities=[250,1000] --set stage2.overrides=[train.epochs=5].")
@click.option("--device", default=None, help=DEVICE_HELP + " For stage I, stage II and the evaluations; "
              "default: the study recipe's device (auto).")
def study(recipe, out, overrides, device) -> None:
    """Data-efficiency study: stage II gain vs triplet count x quality tier x seed (resumable)."""
    from cir.study import Study, load_study_recipe

    r = load_study_recipe(recipe, list(overrides) + ([f"device={device}"] if device else []))
    res = Study(r, out, log=lambda s: click.echo(s, err=True)).run()
    click.echo(json.dumps(res, indent=2))


@main.command()
@click.option("--model", "model_run", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help='A stage-II (or stage-I) run folder.')
@click.option("--gallery", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of images to search (features cached).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help='The reference image.')
@click.option("--text", required=True, help="Modification text.")
@click.option("--top-k", default=10, show_default=True,
              help='How many gallery images to return.')
@click.option("--prompt", default="a photo of * that {}", show_default=True,
              help="Query template: `*` is where the reference image's pseudo-word goes, `{}` the text.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True,
              help='Print the hits as JSON.')
def search(model_run, gallery, image, text, top_k, prompt, device, as_json) -> None:
    """Composed retrieval: find gallery images matching (reference image, modification text)."""
    from cir.search import GalleryIndex

    index = GalleryIndex.build(model_run, gallery, device=device)
    hits = index.query(image, text, top_k=top_k, prompt=prompt)
    if as_json:
        click.echo(json.dumps([{"path": str(p), "score": s} for p, s in hits], indent=2))
    else:
        for rank, (p, s) in enumerate(hits, 1):
            click.echo(f"{rank:3d}  {s:.4f}  {p}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
