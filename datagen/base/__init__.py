"""The base layer both packages stand on: configuration (`config`), recipe loading (`recipes`),
the one CLIP loader (`clip_loader`), shipped files (`assets`), errors, atomic writes and JSON
reading (`io`), device resolution, the image loader and thread control.

Nothing here imports the rest of `datagen` or `cir` (`tests/test_repo.py` checks it). `cir`'s
model library uses this layer, `datagen.schema` (the dataset contract), the shapes world and the
HTML viewer, never the generation stages.
"""
