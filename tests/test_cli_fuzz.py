"""Fuzz-style: a few dozen malformed inputs to each command; every one ends in exactly one line
`error: ...`, a non-zero exit, no traceback, and the working folder is left as it was (nothing
created, nothing changed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli_errors import assert_one_error_line


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of things for commands to trip on: a file, an empty folder, a non-dataset folder,
    a damaged run.json, a run folder without weights, an empty gallery."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "file.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "other").mkdir()
    (root / "other" / "notes.md").write_text("mine\n")
    (root / "badrun").mkdir()
    (root / "badrun" / "run.json").write_text("[1, 2]")
    (root / "norun").mkdir()
    (root / "norun" / "model.json").write_text(json.dumps({"format": "cirgen-cir-model-v1"}))
    (root / "bad.yaml").write_text("kind: gen\nname: [unclosed\n")
    (root / "img.png").write_bytes(b"\x89PNG not really")
    return root


def cases(r: Path):
    f, e, o, b, n = r / "file.txt", r / "empty", r / "other", r / "badrun", r / "norun"
    return [
        # cirgen triplets
        ["triplets", "--n", "0", "--out", str(r / "x")],
        ["triplets", "--n", "-3", "--out", str(r / "x")],
        ["triplets", "--n", "abc", "--out", str(r / "x")],
        ["triplets", "--n", "10", "--out", str(o)],
        ["triplets", "--n", "10", "--out", str(f)],
        ["triplets", "--n", "10", "--out", str(r / "x"), "--recipe", "no-such-recipe"],
        ["triplets", "--n", "10", "--out", str(r / "x"), "--recipe", str(r / "bad.yaml")],
        ["triplets", "--n", "10", "--out", str(r / "x"), "--set", "nope=1"],
        ["triplets", "--n", "10", "--out", str(r / "x"), "--set", "images.resolution=abc"],
        ["triplets", "--n", "10", "--out", str(r / "x"), "--shard", "2/2"],
        ["triplets", "--n", "10", "--out", str(r / "x"), "--seed", "-1"],
        ["triplets", "--n", str(10 ** 12), "--out", str(r / "x")],
        ["triplets", "--n", "10", "--out", str(b)],
        # cirgen inspect / browse
        ["inspect", str(e)],
        ["inspect", str(b)],
        ["inspect", str(r / "missing")],
        ["browse", str(b), "--out", str(r / "report")],
        ["browse", str(e), "--out", str(r / "report")],
        # cirgen stage1
        ["stage1", "--out", str(r / "s1"), "--recipe", "no-such-recipe"],
        ["stage1", "--out", str(r / "s1"), "--set", "mapping.vsi=bogus"],
        ["stage1", "--out", str(r / "s1"), "--set", "mapping.vsi_layers=[99]"],
        ["stage1", "--out", str(r / "s1"), "--set", "train.batch_size=0"],
        ["stage1", "--out", str(r / "s1"), "--set", "views.reference_scale=[0.9,0.1]"],
        ["stage1", "--out", str(r / "s1"), "--set", "loss.soft_alignment=maybe"],
        ["stage1", "--out", str(r / "s1"), "--device", "cuda:7"],
        # cirgen stage2
        ["stage2", "--triplets", str(e), "--stage1", str(e), "--out", str(r / "s2")],
        ["stage2", "--triplets", str(b), "--stage1", str(n), "--out", str(r / "s2")],
        ["stage2", "--triplets", str(e), "--stage1", str(e), "--out", str(r / "s2"), "--set", "compose.mode=bogus"],
        ["stage2", "--triplets", str(e), "--stage1", str(e), "--out", str(r / "s2"), "--set", "hard_negatives.k=-1"],
        ["stage2", "--triplets", str(r / "missing"), "--stage1", str(e), "--out", str(r / "s2")],
        ["stage2", "--triplets", str(e), "--stage1", str(e), "--out", str(r / "s2"), "--device", "cuda"],
        # cirgen eval / search
        ["eval", "--model", str(e), "--dataset", "cirr", "--root", str(e)],
        ["eval", "--model", str(n), "--dataset", "cirr", "--root", str(e)],
        ["eval", "--model", "image-only", "--dataset", "cirr", "--root", str(e)],
        ["eval", "--model", "image-only", "--dataset", "circo", "--root", str(o)],
        ["eval", "--model", "image-only", "--dataset", "fashioniq", "--root", str(e)],
        ["eval", "--model", "image-only", "--dataset", "cirr", "--root", str(e), "--set", "depth=5"],
        ["eval", "--model", "image-only", "--dataset", "cirr", "--root", str(e), "--set", "template=nobraces"],
        ["eval", "--model", "image-only", "--dataset", "cirr", "--root", str(e), "--set", "nope=1"],
        ["eval", "--model", "image-only", "--dataset", "cirr", "--root", str(e), "--device", "cuda"],
        ["search", "--model", str(n), "--gallery", str(e), "--image", str(r / "img.png"), "--text", "x"],
        ["search", "--model", str(e), "--gallery", str(e), "--image", str(r / "img.png"), "--text", "x"],
        # cirgen study / pretrain-clip / eval-clip / benchmark
        ["study", "no-such-study", "--out", str(r / "st")],
        ["study", "shapes", "--out", str(r / "st"), "--set", "nope=1"],
        ["pretrain-clip", "--out", str(r / "pc"), "--set", "nope=1"],
        ["eval-clip", "--weights", str(r / "missing.safetensors")],
        ["eval-clip", "--weights", str(f)],
        ["benchmark", "shapes", "--format", "cirr", "--out", str(o)],
    ]


def test_malformed_inputs_to_every_command_are_one_line_and_change_nothing(world):
    args_list = cases(world)
    assert len(args_list) >= 40
    commands = {a[0] for a in args_list}
    assert {"triplets", "inspect", "browse", "stage1", "stage2", "eval", "search", "study",
            "pretrain-clip", "eval-clip", "benchmark"} <= commands
    for args in args_list:
        before = _snapshot(world)
        assert_one_error_line(args)
        assert _snapshot(world) == before, f"{args} changed the folder"
