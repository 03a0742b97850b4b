"""Decoding real-world oddities: every format Pillow writes, odd modes, EXIF, hostile bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from bottleneck.features.decode import ImageDecodeError, decode_image

from .conftest import image_bytes, synthetic_image

SIZE = 32
RED, BLUE = (220, 20, 20), (20, 20, 220)


def two_halves(left=RED, right=BLUE, size=(120, 60)) -> Image.Image:
    image = Image.new("RGB", size, right)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), left), (0, 0))
    return image


def close_to(pixel, colour, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


def test_plain_jpeg_is_resized_rgb():
    out = decode_image(image_bytes(synthetic_image(RED, 1), "JPEG"), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the stored left column is the visual top row
    data = image_bytes(two_halves(), "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, SIZE)
    assert close_to(out[2, 2], RED) and close_to(out[-3, 2], BLUE)


def test_cmyk_jpeg_becomes_rgb():
    data = image_bytes(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")
    out = decode_image(data, SIZE)
    assert close_to(out[5, 5], (255, 0, 0), tol=50)


def test_sixteen_bit_png_is_scaled_not_clipped():
    image = Image.fromarray(np.full((30, 40), 128 * 257, np.uint16))
    assert image.mode == "I;16"
    data = image_bytes(image, "PNG")
    out = decode_image(data, SIZE)
    assert np.all(np.abs(out.astype(int) - 128) <= 1)


def test_float_tiff_in_unit_range_is_scaled():
    data = image_bytes(Image.fromarray(np.full((20, 20), 0.5, np.float32), "F"), "TIFF")
    assert np.all(np.abs(decode_image(data, SIZE).astype(int) - 128) <= 1)


def test_transparency_becomes_white():
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))
    out = decode_image(image_bytes(rgba, "PNG"), SIZE)
    assert np.all(out == 255)


def test_palette_gif_with_transparent_index():
    image = Image.new("P", (30, 30), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    data = image_bytes(image, "GIF", transparency=1)
    assert np.all(decode_image(data, SIZE) == 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (30, 30), RED), Image.new("RGB", (30, 30), BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert close_to(decode_image(buffer.getvalue(), SIZE)[10, 10], RED)


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("1", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("I", "TIFF"),
        ("RGBA", "PNG"),
        ("CMYK", "TIFF"),
        ("YCbCr", "TIFF"),
        ("LAB", "TIFF"),
        ("I;16", "TIFF"),
        ("F", "TIFF"),
    ],
)
def test_every_common_mode_converts(mode, fmt):
    image = synthetic_image(RED, 3)
    image = Image.fromarray(np.full((20, 20), 1000, np.uint16)) if mode == "I;16" else image.convert(mode)
    assert image.mode == mode
    out = decode_image(image_bytes(image, fmt), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_hsv_image_converts():
    from bottleneck.features.decode import to_rgb

    assert to_rgb(synthetic_image(RED, 3).convert("HSV")).mode == "RGB"


def _writable_formats() -> list[str]:
    Image.init()
    unreadable = {"PDF", "EPS", "PALM", "XVTHUMB", "AVIF", "BUFR", "GRIB", "HDF5", "WMF"}
    formats = sorted(fmt for fmt in Image.SAVE if fmt in Image.OPEN and fmt not in unreadable)
    if features.check("avif"):
        formats.append("AVIF")
    return formats


def _save_any_mode(fmt: str) -> bytes:
    base = synthetic_image(BLUE, 7, size=(64, 48))
    errors = []
    for mode in ("RGB", "RGBA", "L", "P", "1", "F"):
        try:
            return image_bytes(base.convert(mode), fmt)
        except Exception as exc:  # each format accepts some modes only
            errors.append(f"{mode}: {exc}")
    raise AssertionError(f"{fmt} saved no mode: {errors}")


@pytest.mark.parametrize("fmt", _writable_formats())
def test_every_format_pillow_writes_decodes(fmt):
    out = decode_image(_save_any_mode(fmt), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file (0 bytes)"),
        (b"hello, I am text in a .jpg", "not an image Pillow can read (unknown or corrupt format)"),
    ],
)
def test_non_images_have_one_line_reasons(data, reason):
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, SIZE)
    assert str(caught.value) == reason


def test_truncated_jpeg_is_refused_with_reason():
    data = image_bytes(synthetic_image(RED, 2, size=(200, 150)), "JPEG")
    with pytest.raises(ImageDecodeError, match="^truncated image"):
        decode_image(data[: len(data) // 2], SIZE)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_png_claiming(60000, 60000), SIZE)


def test_pixel_limit_is_settable():
    data = image_bytes(synthetic_image(RED, 1), "PNG")
    with pytest.raises(ImageDecodeError, match=r"over the limit of 1,000 \(--max-pixels\)"):
        decode_image(data, SIZE, max_pixels=1000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"])
def test_corrupted_bytes_never_raise_anything_else(fmt):
    original = bytearray(image_bytes(synthetic_image(RED, 5, size=(48, 40)), fmt))
    rng = np.random.default_rng(0)
    for trial in range(40):
        damaged = bytearray(original)
        for position in rng.integers(0, len(damaged), size=1 + trial % 8):
            damaged[position] = int(rng.integers(0, 256))
        cut = len(damaged) if trial % 3 else int(rng.integers(1, len(damaged)))
        try:
            out = decode_image(bytes(damaged[:cut]), SIZE)
        except ImageDecodeError as exc:
            assert "\n" not in str(exc) and str(exc)
        else:
            assert out.shape == (SIZE, SIZE, 3)
