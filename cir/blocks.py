"""Which text-encoder blocks a module hooks into, for any depth.

The released TSCIR code (`src/params.py`, `run_stage*.sh`) names blocks of the 12-block ViT-L/14
text tower: VSI after blocks 3, 7, 9, 11 and composing adapters after 1, 3, 5, 7, 9, 11 (0-indexed,
"after block j" = on block j's output). Towers of other depths need an analogue, so a block choice
is data: a list of indices (negative ones count from the end) or one of these names:

- `all`: every block;
- `every-other`: the last block and every second one before it (12 blocks: 1, 3, ..., 11;
  shapes-CLIP's 4 blocks: 1, 3);
- `tscir-vsi`: the released VSI blocks {3, 7, 9, 11} of 12 moved to the same relative depth,
  block j of 12 -> round((j + 1) * n / 12) - 1 (12 blocks: 3, 7, 9, 11; 4 blocks: 0, 2, 3;
  24 blocks: 7, 15, 19, 23).
"""
from __future__ import annotations

from datagen.base.errors import InputError

TSCIR_VSI_BLOCKS_OF_12 = (3, 7, 9, 11)
NAMED = ("all", "every-other", "tscir-vsi")


def check_block_spec(spec, what: str) -> None:
    """Raise ValueError (naming `what`) for a spec that is neither a known name nor a list of ints."""
    if isinstance(spec, str):
        if spec not in NAMED:
            raise ValueError(f"{what}: {spec!r} is not one of {list(NAMED)} or a list of block indices")
        return
    if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                   for i in spec):
        raise ValueError(f"{what}: expected one of {list(NAMED)} or a non-empty list of block indices, got {spec!r}")


def resolve_blocks(spec, n_blocks: int) -> list[int]:
    """Block indices (sorted, 0-indexed) for a spec on a tower of `n_blocks` blocks.

    Errors: InputError (a ValueError) for an index outside [-n_blocks, n_blocks)."""
    if spec == "all":
        return list(range(n_blocks))
    if spec == "every-other":
        return list(range(n_blocks - 1, -1, -2))[::-1]
    if spec == "tscir-vsi":
        return sorted({max(0, round((j + 1) * n_blocks / 12) - 1) for j in TSCIR_VSI_BLOCKS_OF_12})
    out = set()
    for i in spec:
        if not -n_blocks <= i < n_blocks:
            raise InputError(f"block {i} does not exist in a {n_blocks}-block text tower (layers: {list(spec)})")
        out.add(i % n_blocks)
    return sorted(out)
