"""`cirgen`: the command line. Thin: parse, load a recipe, call the library, print."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click


class _Fail(click.ClickException):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _guard(fn, *args, **kwargs):
    """Turn the library's input errors into one clear line and a non-zero exit."""
    from datagen.config import ConfigError
    from datagen.pipeline import PipelineError
    from datagen.schema import DatasetError
    from datagen.store import StoreError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, StoreError, DatasetError, PipelineError) as e:
        raise _Fail(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cirgen")
def main() -> None:
    """cirgen: synthetic triplets and two-stage training for zero-shot composed image retrieval."""


@main.command()
@click.option("--n", "n", type=int, required=True, help="Number of kept triplets the dataset should hold.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset folder (created, resumed or extended).")
@click.option("--recipe", default="shapes-high", show_default=True,
              help="Generation recipe: a name in recipes/gen/ or a YAML path.")
@click.option("--quality", type=click.Choice(["high", "low"]), default=None,
              help="Shortcut for --recipe shapes-high / shapes-low.")
@click.option("--seed", type=int, default=None, help="Seed (default: the recipe's).")
@click.option("--workers", type=int, default=None, help="Processes (default: one per CPU core).")
@click.option("--shard", default=None, metavar="I/N", help="Run only work units u with u % N == I.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def triplets(n, out, recipe, quality, seed, workers, shard, overrides, as_json, quiet) -> None:
    """Generate (or resume, or extend) a dataset of N synthetic triplets."""
    from datagen.pipeline import generate, summary_lines
    from datagen.recipe import load_gen_recipe, resolve_recipe_path
    if quality is not None:
        if recipe != "shapes-high":
            raise _Fail("give either --recipe or --quality, not both")
        recipe = f"shapes-{quality}"
    if n <= 0:
        raise _Fail(f"--n must be a positive number of triplets, got {n}")
    shard_t = None
    if shard:
        try:
            i, k = (int(x) for x in shard.split("/"))
            assert 0 <= i < k
            shard_t = (i, k)
        except (ValueError, AssertionError):
            raise _Fail(f"--shard {shard!r}: expected I/N with 0 <= I < N") from None
    r = _guard(load_gen_recipe, recipe, list(overrides))
    path = str(_guard(resolve_recipe_path, recipe, "gen"))
    log = (lambda s: click.echo(s, err=True)) if not as_json else (lambda s: None)
    stats = _guard(generate, r, out, n, seed=seed, workers=workers, recipe_path=path,
                   progress=not quiet and not as_json, log=log, shard=shard_t)
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

    report = _guard(inspect_dataset, dataset, examples)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else render_text(report))


@main.command("pretrain-clip")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--recipe", default="shapes-clip", show_default=True,
              help="A name in recipes/train/ or a YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def pretrain_clip(out, recipe, overrides) -> None:
    """Train shapes-CLIP from scratch on the shapes world (resumable: rerun to continue)."""
    from cir.shapes_clip import load_pretrain_recipe, pretrain

    cfg = _guard(load_pretrain_recipe, recipe, list(overrides))
    path = pretrain(cfg, out, log=lambda s: click.echo(s, err=True))
    click.echo(f"wrote {path}")


@main.command("eval-clip")
@click.option("--weights", default=None, help="Weights file (default: the shipped shapes-CLIP).")
@click.option("--scenes", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_clip(weights, scenes, as_json) -> None:
    """Measure shapes-CLIP on held-out scenes with held-out phrasing (retrieval and probes)."""
    from cir.shapes_clip import evaluate, pair_similarities
    from datagen.clip_loader import load_clip

    clip = load_clip("shapes-clip", pretrained=weights)
    res = {"retrieval": evaluate(clip, n_scenes=scenes), "pairs": pair_similarities(clip)}
    click.echo(json.dumps(res, indent=2 if as_json else None, sort_keys=True))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
