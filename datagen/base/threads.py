"""One CPU thread count for every computation whose numbers end up in records.

torch's CPU kernels split their work by the intra-op thread count, and some of them (reductions,
oneDNN's blocked convolutions and GEMMs) then add partial sums in another order: a CLIP score or a
diffusion image computed with 2 threads can differ in its last bits from one computed with 1. The
pipeline runs torch on 1 thread in its pool workers (a forked libgomp cannot go multi-threaded)
but on torch's default in a single-process run (`--workers 1`, which is also what a rerun with
one unit left gets), so without a fixed count the records would depend on the process layout.

`record_threads(device)` runs its block on `RECORD_THREADS` CPU threads and restores the count
after; on a GPU device it does nothing (CUDA kernels do not depend on it). The price is CPU
speed in a single-process run: use more workers (processes) rather than threads for CPU work.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

RECORD_THREADS = 1


@contextmanager
def record_threads(device: object = "cpu") -> Iterator[None]:
    """Run the block with torch on `RECORD_THREADS` intra-op threads when `device` is the CPU
    (a `torch.device` or a name such as "cpu", "cuda:0"); restore the previous count after. Any device
    whose name does not start with "cpu" (including an unresolved "auto") leaves the count alone."""
    if not str(device).startswith("cpu"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before != RECORD_THREADS:
        torch.set_num_threads(RECORD_THREADS)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
