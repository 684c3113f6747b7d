"""Bad input to the CLI ends in exactly one line, `error: ...`, a non-zero exit and no traceback
(the CLI group turns every CirgenError and click usage error into that line); bad caption files
fail before the dataset folder is written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cir.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)      # click 8.1 mixes stderr into output by default
    except TypeError:
        return CliRunner()                      # click >= 8.2: stderr is always separate


def assert_one_error_line(args: list[str], *expect: str) -> str:
    res = _runner().invoke(main, args, prog_name="cirgen")
    out = res.stdout + res.stderr
    assert res.exit_code != 0, out
    assert isinstance(res.exception, SystemExit), f"escaped: {res.exception!r}"
    assert "Traceback" not in out
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def real(captions: Path, *sets: str) -> list[str]:
    """Real-caption generation args (nothing loads before the caption file is checked)."""
    args = ["--recipe", "real-low", "--set", f"captions.path={captions}", "--set", "edits.backend=keywords",
            "--quiet", "--workers", "1"]
    for s in sets:
        args += ["--set", s]
    return args


def test_malformed_recipe_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: gen\ncaptions: [\n")
    assert_one_error_line(["triplets", "--n", "4", "--out", str(tmp_path / "o"), "--recipe", str(bad)],
                          "bad.yaml", "malformed YAML")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, content, sets, expect", [
    ("nocol.csv", "text,other\n\"a red car\",1\n", [], ["nocol.csv:1", "no column 'caption'"]),
    ("row.csv", "caption,n\n\"a red car\",1\n\"\",2\n", ["captions.bad_rows=error"], ["row.csv:3", "empty caption"]),
    ("wide.csv", "caption,n\n\"a red car\",1,extra\n", ["captions.bad_rows=error"], ["wide.csv:2", "expected 2 fields"]),
    ("empty.txt", "", [], ["empty.txt", "no caption rows"]),
    ("nul.txt", "a dog\n\x00\x00\n", ["captions.bad_rows=error"], ["nul.txt:2", "NUL"]),
])
def test_bad_caption_files_fail_before_the_folder_is_written(tmp_path, name, content, sets, expect):
    f = tmp_path / name
    f.write_text(content)
    out = tmp_path / "ds"
    assert_one_error_line(["triplets", "--n", "4", "--out", str(out)] + real(f, *sets), *expect)
    assert not out.exists()


def test_unwritable_output(tmp_path):
    (tmp_path / "somefile").write_text("x")          # tests run as root: a path under a file fails
    assert_one_error_line(["triplets", "--n", "4", "--out", str(tmp_path / "somefile" / "x"), "--quiet"],
                          "somefile")
    assert_one_error_line(["triplets", "--n", "4", "--out", str(tmp_path / "somefile")], "--out")


@pytest.mark.parametrize("shard", ["3/2", "x", "-1/2", "1/0", "2/2", "1/2/3", "", "1.0/2"])
def test_bad_shard(tmp_path, shard):
    assert_one_error_line(["triplets", "--n", "4", "--out", str(tmp_path / "o"), "--shard", shard], "--shard")
    assert not (tmp_path / "o").exists()


def test_bad_shard_is_refused_without_asserts(tmp_path):
    """`python -O` strips assert statements: the check must not be one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-O", "-m", "cir.cli", "triplets", "--n", "4", "--out",
                          str(tmp_path / "o"), "--shard", "-1/2"], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and res.stderr.startswith("error: --shard '-1/2'") and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_usage_errors_are_one_line():
    for args in ([], ["benchmark"]):                  # no arguments: the help, not an error
        res = _runner().invoke(main, args, prog_name="cirgen")
        assert "Commands:" in res.stdout + res.stderr and "error:" not in res.stdout + res.stderr
    assert_one_error_line(["triplets", "--n", "x", "--out", "o"], "--n", "cirgen triplets --help")
    assert_one_error_line(["no-such-command"], "no-such-command")
    assert_one_error_line(["--no-such-option"], "--no-such-option")


def test_benchmark_and_search_problems(tmp_path):
    assert_one_error_line(["benchmark", "shapes", "--format", "cirr", "--out", str(tmp_path / "b"),
                           "--queries", "0"], "n_queries")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_error_line(["benchmark", "shapes", "--format", "cirr", "--out", str(tmp_path / "full"),
                           "--queries", "2"], "not empty")
    (tmp_path / "g").mkdir()
    img = tmp_path / "q.png"
    img.write_bytes(b"not read")
    assert_one_error_line(["search", "--model", str(tmp_path / "g"), "--gallery", str(tmp_path / "g"),
                           "--image", str(img), "--text", "x"], "no images")


def test_every_option_of_every_command_says_what_it_is():
    import click

    from cir.cli import main

    missing = []
    for name, cmd in main.commands.items():
        subs = cmd.commands.items() if isinstance(cmd, click.Group) else [(name, cmd)]
        for sub, c in subs:
            missing += [f"{sub} --{p.name}" for p in c.params if isinstance(p, click.Option) and not p.help]
    assert missing == []
