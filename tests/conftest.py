import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from datagen.recipe import load_gen_recipe  # noqa: E402
from datagen.schema import TIMING_COLUMNS  # noqa: E402

SMALL = ["images.resolution=32", "pipeline.unit_size=50", "pipeline.batch_size=16"]


@pytest.fixture
def small_recipe():
    def make(name="shapes-high", extra=()):
        return load_gen_recipe(name, SMALL + list(extra))
    return make


def dataset_content(root) -> dict:
    """Every shard's rows without the timing columns: what must be identical between runs."""
    out = {}
    for sub in ("shards", "rejects"):
        for p in sorted((root / sub).glob("*.parquet")):
            t = pq.read_table(p)
            t = t.drop_columns([c for c in TIMING_COLUMNS if c in t.column_names])
            out[f"{sub}/{p.name}"] = t.to_pylist()
    return out


def file_states(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}
