"""Image files in and out (deqir_fast/image_io.py) at the level of samples: saving rounds
to the nearest level at 8 and 16 bits, and 16-bit colour is read with all 16 bits.

No library installed here writes a 16-bit colour PNG (Pillow has no 16-bit colour mode),
so ``png16`` below encodes one: a few lines of the PNG format with every row filter, so
that reading is checked against data whose filters depend on the bytes per pixel.
"""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from deqir_fast import image_io as io


# -- a 16-bit PNG writer for the tests ----------------------------------------------------
def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filtered(row: bytes, prev: bytes, kind: int, bpp: int) -> bytes:
    """PNG filter ``kind`` (0 none, 1 sub, 2 up, 3 average, 4 paeth) of one row."""
    out = bytearray([kind])
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
        out.append((x - pred) % 256)
    return bytes(out)


def png16(path, values: np.ndarray) -> None:
    """Write uint16 H x W x C (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) as a 16-bit PNG,
    row k with filter k mod 5."""
    h, w, c = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = [values[i].astype(">u2").tobytes() for i in range(h)]
    prev = bytes(len(rows[0]))
    data = b""
    for i, row in enumerate(rows):
        data += _filtered(row, prev, i % 5, 2 * c)
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data))
                + chunk(b"IEND", b""))


def random16(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, shape).astype(np.uint16)


def levels(pixels: np.ndarray) -> np.ndarray:
    return np.rint(pixels.astype(np.float64) * 65535).astype(np.int64)


def test_png16_writer_agrees_with_pillow_on_grey(tmp_path):
    """The test's own encoder, checked where Pillow can decode all 16 bits (grey)."""
    values = random16((9, 11, 1))
    png16(tmp_path / "g.png", values)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), values[..., 0])


# -- reading 16-bit colour -----------------------------------------------------------------
@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png_keeps_all_bits(tmp_path, channels):
    """Issue #22: a 16-bit RGB PNG was read as 8-bit without a word. The low bytes are
    random, so a reader that keeps only the high byte is off by up to 255 levels."""
    values = random16((9, 11, channels))
    png16(tmp_path / "c.png", values)
    pic = io.read_image(tmp_path / "c.png")
    assert pic.pixels.shape == (9, 11, 3) and pic.pixels.dtype == np.float32
    assert np.array_equal(levels(pic.pixels), values[..., :3])
    assert pic.bits == 16 and any("16-bit colour" in n for n in pic.notes)
    assert any("alpha channel dropped" in n for n in pic.notes) == (channels == 4)


def test_16bit_grey_with_alpha_png_is_grey(tmp_path):
    """Pillow expands 16-bit grey + alpha to RGBA (R = G = B): it is read as 16-bit grey."""
    values = random16((9, 11, 2), seed=1)
    png16(tmp_path / "la.png", values)
    pic = io.read_image(tmp_path / "la.png")
    assert pic.pixels.shape == (9, 11, 1) and pic.bits == 16
    assert np.array_equal(levels(pic.pixels[..., 0]), values[..., 0])
    assert any("alpha channel dropped (restoring the L channels)" in n for n in pic.notes)


def test_8bit_and_16bit_grey_depths(tmp_path):
    grey = random16((6, 7, 1), seed=2)
    png16(tmp_path / "g16.png", grey)
    Image.fromarray((grey[..., 0] >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    assert io.read_image(tmp_path / "g16.png").bits == 16
    g8 = io.read_image(tmp_path / "g8.png")
    assert g8.bits == 8 and not g8.notes


# -- writing: the nearest level, at 8 and 16 bits -----------------------------------------
def test_quantize_rounds_to_the_nearest_level():
    assert io.quantize(np.array([0.999]), 8)[0] == 255            # not 254 (issue #22)
    assert io.quantize(np.array([1 - 0.4 / 65535]), 16)[0] == 65535
    for bits in (8, 16):
        top = 2 ** bits - 1
        k = np.arange(0, top, max(1, top // 997))
        below, above = (k + 0.45) / top, (k + 0.55) / top
        assert np.array_equal(io.quantize(below, bits), k)
        assert np.array_equal(io.quantize(above, bits), k + 1)
        assert np.array_equal(io.quantize(np.array([-0.5, 1.5]), bits), [0, top])   # clipped
    with pytest.raises(ValueError, match="bits must be 8 or 16"):
        io.quantize(np.zeros(2), 12)


@pytest.mark.parametrize("ext, bits, channels", [
    (".png", 8, 3), (".png", 8, 1), (".tif", 8, 3), (".bmp", 8, 3),
    (".png", 16, 1), (".tif", 16, 1), (".tif", 16, 3)])
def test_saved_files_hold_the_nearest_level(tmp_path, ext, bits, channels):
    """What is on disk, read back: every value half a level or less from a level is saved
    as that level (a truncating writer saves the ones just below as the level under)."""
    top = 2 ** bits - 1
    rng = np.random.default_rng(bits + channels)
    k = rng.integers(0, top, (8, 10, channels))
    offset = rng.uniform(-0.45, 0.45, k.shape)
    pixels = np.clip((k + offset) / top, 0, 1).astype(np.float32)
    path = tmp_path / f"out{ext}"
    io.save_pixels(pixels, path, io.output_format(path), bits)
    back = io.read_image(path)
    assert back.bits == bits
    got = np.rint(back.pixels.astype(np.float64) * top).astype(np.int64)
    assert np.array_equal(got, k)


def test_16bit_writing_where_the_format_allows():
    assert io.can_write_16bit("TIFF", 3) and io.can_write_16bit("TIFF", 1)
    assert io.can_write_16bit("PNG", 1) and not io.can_write_16bit("PNG", 3)
    assert not io.can_write_16bit("JPEG", 1)
    with pytest.raises(ValueError, match="cannot write 3-channel PNG at 16 bits"):
        io.save_pixels(np.zeros((2, 2, 3), np.float32), "x.png", "PNG", 16)
