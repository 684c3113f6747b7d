"""`cirgen eval --report`: every evaluated query becomes a card with its top results."""
import json

from click.testing import CliRunner

from cir.cli import main
from datagen.world.benchmark import write_shapes_benchmark


def test_eval_writes_a_retrieval_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRGEN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "bench"
    write_shapes_benchmark(root, "cirr", n_queries=12, seed=3, resolution=64)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["eval", "--model", "image-only", "--weights", "random", "--dataset",
                                  "shapes-cirr", "--root", str(root), "--report", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "report.json").read_text())
    assert meta["kind"] == "retrieval" and meta["rows"] == 12
    assert (out / "index.html").exists() and any((out / "thumbs").iterdir())
    assert "wrote" in r.output and "index.html" in r.output
