"""The base layer both packages stand on: errors (and, as they move here, the other shared helpers).

`cir` may import `datagen.base` and `datagen.schema`; nothing here imports `datagen`'s stages or `cir`.
"""
