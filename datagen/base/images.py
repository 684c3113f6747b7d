"""The one image loader: any common image file -> the RGB pixels a person sees, or an error naming it.

Every stage that reads images a user supplied (stage I and II sources, evaluation, search, the
generation filters, dedupe, the contamination check, report thumbnails) goes through
`open_image`, so they all see the same pixels:

- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`): a phone photo stored sideways
  with an Orientation tag is upright, as every viewer shows it;
- 16-bit and 32-bit greyscale (PNG, TIFF: PIL modes `I;16*`, `I`) is scaled to 8 bits
  (v / 257; a 32-bit image with values above 65535 by max / 255), not clipped (PIL's own
  `convert` turns anything above 255 white); float (`F`) images in [0, 1] are scaled by 255,
  others clipped to [0, 255];
- palette (with or without transparency), greyscale+alpha, RGBA and CMYK become RGB; transparent
  pixels are composited on white (what a viewer on a white page shows), not on black;
- a truncated file is an error: the file is decoded in full (`load()`), and PIL raises on missing
  data because `ImageFile.LOAD_TRUNCATED_IMAGES` stays False (never set it: it hides broken files).

`open_image` raises `ImageError` (a `CirgenError`, also a `ValueError` for callers that count
unreadable rows) whose message starts with the caller's `where` (file, row, entry).
`looks_truncated` is the cheap tail check the benchmark integrity check uses before paying for a
full decode. `LOADER_VERSION` goes into every cache key of features computed from these pixels.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import CirgenError

# Bump when the pixels `open_image` returns for some file change: feature caches keyed on it
# (cir.features, contamination hashes) then stop matching instead of serving the old pixels.
LOADER_VERSION = 2

ImageSource = bytes | bytearray | memoryview | str | os.PathLike


class ImageError(CirgenError, ValueError):
    """An image that cannot be read; the message names the file (or row) and says why."""


def open_image(source: ImageSource, where: str | None = None, draft: tuple[int, int] | None = None):
    """Decode `source` (encoded bytes or a file path) into an RGB `PIL.Image.Image`.

    `where` names the image in messages (default: the path, or "image bytes"). `draft`: let a
    JPEG decode at a reduced scale no smaller than (width, height) (thumbnails: much faster). Raises
    `ImageError` for a missing or unreadable file, a non-image, a truncated file, a decompression
    bomb (more than 2 x `PIL.Image.MAX_IMAGE_PIXELS`) or a mode PIL cannot turn into RGB.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    where = where or ("image bytes" if is_bytes else str(source))
    try:
        fp = io.BytesIO(bytes(source)) if is_bytes else open(os.fspath(source), "rb")
    except FileNotFoundError:
        raise ImageError(f"{where}: image file not found") from None
    except OSError as e:
        raise ImageError(f"{where}: image cannot be read ({e.strerror or e})") from None
    try:
        with fp, Image.open(fp) as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()                           # decodes every pixel: truncation raises here
            im = ImageOps.exif_transpose(im)    # a copy, detached from the file
            return to_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(f"{where}: image cannot be decoded (not an image file PIL can read)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where}: image cannot be decoded (too large: {e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        # PIL reports corrupt data as any of these (truncated: OSError "image file is truncated").
        raise ImageError(f"{where}: image cannot be decoded ({type(e).__name__}: {e})") from None


def to_rgb(im):
    """An RGB copy of a decoded PIL image by the rules in the module docstring."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im.copy() if im.readonly else im
    if mode.startswith("I"):                    # I;16, I;16B, I;16L, I;16N, I (PNG 16-bit grey)
        a = np.asarray(im, dtype=np.float64)
        scale = 257.0 if a.size == 0 or a.max() <= 65535 else a.max() / 255.0
        return Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")               # palette/RGB/L transparency (tRNS) included
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")                    # 1, L, P, CMYK (Adobe inversion done by PIL), YCbCr


# Format signatures and what a complete file ends with.
_JPEG_END = b"\xff\xd9"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def looks_truncated(path: str | os.PathLike) -> bool:
    """True when a JPEG, PNG, GIF or WebP file does not end as a complete one does.

    Reads 16 bytes at each end (microseconds): a download cut short loses the end marker. It can
    err towards True (a JPEG with data after its end marker, such as a phone's motion photo), so a
    True is a reason to decode the file in full, not a verdict. Other formats: False. An unreadable
    or missing file raises OSError (FileNotFoundError, PermissionError).
    """
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 16))
        tail = f.read(16)
    if head[:3] == b"\xff\xd8\xff":
        return not tail.rstrip(b"\x00\r\n ").endswith(_JPEG_END)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return not tail.endswith(_PNG_END)
    if head[:4] == b"GIF8":
        return not tail.endswith(b"\x3b")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 > size
    return False
