"""The one image loader (datagen.base.images.open_image): each decoding variant on a file made here."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from datagen.base.errors import CirgenError
from datagen.base.images import ImageError, looks_truncated, open_image


def _png_bytes(w: int, h: int, bit_depth: int, color_type: int, rows: np.ndarray) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB): rows [h, w*channels] big-endian."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + r.tobytes() for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _px(img: Image.Image, xy=(0, 0)) -> tuple:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (8, 4), (255, 0, 0))
    im.paste((0, 0, 255), (4, 0, 8, 4))              # left red, right blue, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6                                 # Orientation: rotate 90 CW to display
    im.save(tmp_path / "phone.png", exif=exif)
    out = open_image(tmp_path / "phone.png")
    assert out.size == (4, 8)                        # shown portrait, as a viewer shows it
    assert _px(out, (2, 1)) == (255, 0, 0) and _px(out, (2, 6)) == (0, 0, 255)
    plain = Image.open(tmp_path / "phone.png").convert("RGB")
    assert plain.size == (8, 4)                      # what PIL alone gives: sideways


def test_16bit_grey_png_and_tiff_are_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100, 32768, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    Image.fromarray(a).save(tmp_path / "g16.tif")
    for name in ("g16.png", "g16.tif"):
        out = np.asarray(open_image(tmp_path / name))
        assert out[0, :, 0].tolist() == [0, 100, 128, 255], name
        assert Image.open(tmp_path / name).convert("RGB").getpixel((1, 0)) == (255, 255, 255)  # PIL clips


def test_16bit_rgb_png_and_float_tiff(tmp_path):
    rows = np.zeros((2, 6), ">u2")
    rows[:, 0::3], rows[:, 1::3], rows[:, 2::3] = 257 * 200, 257 * 10, 65535
    assert _px(open_image(_png_bytes(2, 2, 16, 2, rows))) == (200, 10, 255)
    Image.fromarray(np.full((2, 2), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    assert _px(open_image(tmp_path / "f.tif")) == (128, 128, 128)


def test_alpha_and_palette_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = open_image(buf.getvalue())
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (127, 127, 127)
    la = Image.new("LA", (2, 1), (100, 0))
    la.putpixel((1, 0), (100, 255))
    la.save(tmp_path / "la.png")
    out = open_image(tmp_path / "la.png")
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (100, 100, 100)
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)      # index 0 (black) is transparent
    out = open_image(tmp_path / "p.png")
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (255, 0, 0)
    assert Image.open(tmp_path / "p.png").convert("RGB").getpixel((0, 0)) == (0, 0, 0)  # PIL: black
    Image.new("P", (1, 1), 1).putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    q = Image.new("P", (1, 1), 1)
    q.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    q.save(tmp_path / "q.gif")                        # palette without transparency
    assert _px(open_image(tmp_path / "q.gif")) == (0, 255, 0)


def test_cmyk_jpeg_and_grey(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    r, g, b = _px(open_image(tmp_path / "c.jpg"))
    assert r > 230 and g < 30 and b < 30               # red, as printed
    Image.new("L", (2, 2), 77).save(tmp_path / "l.jpg")
    assert _px(open_image(tmp_path / "l.jpg")) == (77, 77, 77)


def _jpeg(tmp_path, name="a.jpg") -> bytes:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name, quality=90)
    return (tmp_path / name).read_bytes()


def test_truncated_and_unreadable_files_name_the_file(tmp_path):
    data = _jpeg(tmp_path)
    assert not looks_truncated(tmp_path / "a.jpg")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert looks_truncated(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match=r"^row 7 of x\.csv: image cannot be decoded .*truncated"):
        open_image(tmp_path / "cut.jpg", "row 7 of x.csv")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    assert not looks_truncated(tmp_path / "a.png")
    (tmp_path / "cut.png").write_bytes(png[:-20])
    assert looks_truncated(tmp_path / "cut.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("empty.jpg", "text.png"):
        with pytest.raises(ImageError, match=rf"{name}: image cannot be decoded"):
            open_image(tmp_path / name)
    with pytest.raises(ImageError, match=r"gone\.png: image file not found"):
        open_image(tmp_path / "gone.png")
    assert issubclass(ImageError, CirgenError) and issubclass(ImageError, ValueError)
    # Data after the end marker (a phone's motion photo) is suspicious but decodes: not an error.
    (tmp_path / "motion.jpg").write_bytes(data + b"ftypmp42" + b"\x01" * 100)
    assert looks_truncated(tmp_path / "motion.jpg") and open_image(tmp_path / "motion.jpg").size == (64, 64)


def test_truncated_images_are_never_loaded_silently():
    import cir.data  # noqa: F401 - importing the project must not switch PIL to lenient mode
    import cir.eval.benchmarks  # noqa: F401
    import datagen.report.thumbs  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_call_sites_use_the_loader(tmp_path):
    """cir.data, the CLIP scorer's input (filters, dedupe, contamination) and report thumbnails
    all show the upright, white-backed pixels."""
    from cir.data import DataError
    from cir.data import open_image as data_open
    from datagen.clip_scores import to_pil
    from datagen.report.thumbs import make_thumbnail

    im = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    data = buf.getvalue()
    for out in (data_open(data, "x"), to_pil(data), Image.open(io.BytesIO(make_thumbnail(data, 64)))):
        assert out.size == (4, 8) and out.convert("RGB").getpixel((1, 1))[0] > 240
    with pytest.raises(DataError, match="image cannot be decoded"):
        data_open(b"junk", "pairs.csv line 3")
