"""The triplet record and the dataset folder: the contract `cir` and every other reader rely on.

A dataset is a folder:

    run.json             resolved recipe, seed, target size, package versions, recipe hash
    shards/NNNNNN.parquet  kept triplets of work unit NNNNNN (HF `Image()` columns)
    rejects/NNNNNN.parquet candidates of that unit the filters rejected (same columns; absent if none)
    stats.json           counts, pass rates, failure labels, seconds per stage
    README.md            dataset card

`datasets.load_dataset("parquet", data_files="DIR/shards/*.parquet")` reads it with decoded
images; `TripletReader` reads it without `datasets`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .base.errors import CirgenError

SCHEMA_VERSION = 1
FORMAT = "cirgen-triplets"
STAGES = ("captions", "edits", "images", "filters")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# (name, arrow type, HF feature) of the columns every dataset has; filters add score_*/pass_*.
CORE_COLUMNS: list[tuple[str, pa.DataType, dict]] = [
    ("id", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("index", pa.int64(), {"dtype": "int64", "_type": "Value"}),
    ("reference_image", IMAGE_TYPE, {"_type": "Image"}),
    ("target_image", IMAGE_TYPE, {"_type": "Image"}),
    ("modification_text", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("source_caption", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("target_caption", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("edit_type", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("quality", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("failure", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("kept", pa.bool_(), {"dtype": "bool", "_type": "Value"}),
    ("reject_reason", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("seed", pa.int64(), {"dtype": "int64", "_type": "Value"}),
    ("generator", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("source_scene", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("target_scene", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("intended_scene", pa.string(), {"dtype": "string", "_type": "Value"}),
] + [(f"seconds_{s}", pa.float64(), {"dtype": "float64", "_type": "Value"}) for s in STAGES]

# Columns that are measurements of this run rather than data: excluded from determinism checks.
TIMING_COLUMNS = tuple(f"seconds_{s}" for s in STAGES)


def build_schema(score_columns: list[str], pass_columns: list[str]) -> pa.Schema:
    cols = list(CORE_COLUMNS)
    cols += [(c, pa.float64(), {"dtype": "float64", "_type": "Value"}) for c in score_columns]
    cols += [(c, pa.bool_(), {"dtype": "bool", "_type": "Value"}) for c in pass_columns]
    features = {name: feat for name, _, feat in cols}
    hf = json.dumps({"info": {"features": features}})
    return pa.schema([pa.field(n, t) for n, t, _ in cols], metadata={"huggingface": hf})


class DatasetError(CirgenError, ValueError):
    """A dataset folder that cannot be read as a triplet dataset; says which file and why."""


@dataclass
class TripletReader:
    """Streaming reader of a triplet dataset folder (kept triplets; rejects on request)."""
    root: Path

    def __init__(self, root: str | Path):
        self.root = Path(root)
        run = self.root / "run.json"
        if not run.exists():
            raise DatasetError(f"{self.root}: not a triplet dataset (no run.json)")
        from .store import read_run_json   # checks every field; DatasetError naming run.json

        self.run = read_run_json(run)

    def shard_paths(self, rejects: bool = False) -> list[Path]:
        return sorted((self.root / ("rejects" if rejects else "shards")).glob("*.parquet"))

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.shard_paths())

    def iter_batches(self, columns: list[str] | None = None, rejects: bool = False,
                     batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

        for path in self.shard_paths(rejects):
            try:
                pf = pq.ParquetFile(path)
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"{path}: unreadable shard ({e})") from None

    def iter_records(self, columns: list[str] | None = None, rejects: bool = False) -> Iterator[dict]:
        for batch in self.iter_batches(columns, rejects):
            yield from batch.to_pylist()

    def table(self, columns: list[str] | None = None, rejects: bool = False) -> pa.Table:
        import pyarrow.parquet as pq

        paths = self.shard_paths(rejects)
        if not paths:
            return pa.table({})
        return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)
