"""The TensorFlow-graph decoder reproduces decode_image bit for bit (CMYK JPEG: within 1).

Every image is written here with Pillow (or by hand, for PNG variants Pillow cannot write) and
decoded by `decode_image` and by `decode_batch_graph` inside a tf.function with a [None] string
signature. At size 75 that function is first saved as a SavedModel and restored, so those cases
run the way an exported model serves them; size 299 runs the in-process tf.function.
"""

from __future__ import annotations

import functools
import io
import struct
import tempfile
import zlib
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from bottleneck.features.decode import decode_image

tf = pytest.importorskip("tensorflow")

from bottleneck.features.graph_decode import (  # noqa: E402
    decode_batch_graph,
    decode_image_graph,
    resize_bilinear_like_pillow,
)

SIZES = (75, 299)
SAVED_MODEL_SIZE = 75
# The fast suite checks the exported (SavedModel) decoder; tracing the in-process one at 299 costs 4-5 s more.
FAST_AT_75 = [SAVED_MODEL_SIZE, pytest.param(299, marks=pytest.mark.slow)]


# ----------------------------------------------------------------------------------------------
# Running both decoders


def batch_decoder(size: int) -> Callable:
    return tf.function(
        lambda contents: decode_batch_graph(contents, size),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )


@functools.cache
def graph_decoder(size: int) -> Callable:
    if size != SAVED_MODEL_SIZE:
        return batch_decoder(size)
    module = tf.Module()
    module.decode = batch_decoder(size)
    # Tracing happens once, inside save; the tests then use only what the SavedModel holds.
    directory = tempfile.mkdtemp(prefix="graph-decode-")
    tf.saved_model.save(module, directory)
    return tf.saved_model.load(directory).decode


def graph_decode(data: bytes, size: int) -> np.ndarray:
    return graph_decoder(size)(tf.constant([data])).numpy()[0]


def max_difference(data: bytes, size: int) -> int:
    expected = decode_image(data, size)
    actual = graph_decode(data, size)
    assert actual.shape == expected.shape == (size, size, 3) and actual.dtype == np.uint8
    return int(np.abs(actual.astype(np.int16) - expected.astype(np.int16)).max())


# ----------------------------------------------------------------------------------------------
# Pixels and files


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients and waves with mild noise: compresses like a photograph."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    waves = np.stack(
        [
            128 + 90 * np.sin(xx / 37.0 + yy / 53.0 + seed),
            128 + 90 * np.cos(xx / 23.0 - yy / 41.0),
            128 + 60 * np.sin((xx + 2 * yy) / 17.0),
        ],
        axis=-1,
    )
    return np.clip(waves + rng.normal(0, 10, waves.shape), 0, 255).astype(np.uint8)


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg(pixels: np.ndarray, **params) -> bytes:
    return encode(Image.fromarray(pixels), "JPEG", **params)


def orientation_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def big_endian_exif(orientation: int) -> bytes:
    """Pillow writes little-endian EXIF; cameras also write Motorola byte order."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\x00" * 4


def png(pixels: np.ndarray, colour_type: int, depth: int, chunks: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A PNG written by hand, for bit depths and colour types Pillow does not write."""
    samples = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    if depth == 16:
        rows = [row.astype(">u2").tobytes() for row in samples]
    elif depth == 8:
        rows = [row.astype(np.uint8).tobytes() for row in samples]
    else:
        bits = np.unpackbits(samples.astype(np.uint8)[..., None], axis=-1)[..., 8 - depth :]
        rows = [np.packbits(row.reshape(-1)).tobytes() for row in bits]
    raw = b"".join(b"\x00" + row for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], depth, colour_type, 0, 0, 0)
    body = b"".join(chunk(kind, data) for kind, data in chunks)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def gif_with_offset_frame(transparency: int | None) -> bytes:
    """A GIF whose first frame covers only part of a larger logical screen, away from the corner."""
    image = Image.fromarray(photo(30, 20, seed=4)).quantize(32)
    data = bytearray(encode(image, "GIF", **({} if transparency is None else {"transparency": transparency})))
    descriptor = data.index(b"\x2c\x00\x00\x00\x00")
    data[6:10] = struct.pack("<HH", 44, 29)
    data[descriptor + 1 : descriptor + 5] = struct.pack("<HH", 7, 5)
    return bytes(data)


def top_down_bmp() -> bytes:
    pixels = photo(13, 7, seed=5)
    data = bytearray(encode(Image.fromarray(pixels), "BMP"))
    offset, stride = struct.unpack("<I", data[10:14])[0], (13 * 3 + 3) // 4 * 4
    rows = [data[offset + i * stride : offset + (i + 1) * stride] for i in range(7)]
    data[offset:] = b"".join(reversed(rows))
    data[22:26] = struct.pack("<i", -7)
    return bytes(data)


def transparent_alpha(pixels: np.ndarray, seed: int = 1) -> np.ndarray:
    """Alpha with fully transparent, fully opaque and partial pixels."""
    alpha = noise(pixels.shape[1], pixels.shape[0], 1, seed)
    alpha[: pixels.shape[0] // 3] = 0
    alpha[-pixels.shape[0] // 3 :] = 255
    return np.dstack([pixels, alpha])


def palette_with_alpha_png() -> bytes:
    image = Image.fromarray(photo(41, 29, seed=6)).quantize(16)
    alphas = bytes([0, 80, 160, 255, 30, 200])  # shorter than the palette: the rest stay opaque
    return encode(image, "PNG", transparency=alphas)


def keyed_png(mode: str) -> bytes:
    pixels = photo(37, 23, seed=7)
    if mode == "L":
        gray = pixels[..., 0].copy()
        gray[:6] = 77
        return encode(Image.fromarray(gray), "PNG", transparency=77)
    pixels[:6] = (1, 2, 3)
    return encode(Image.fromarray(pixels), "PNG", transparency=(1, 2, 3))


def sixteen_bit(width: int, height: int, channels: int, seed: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (height, width, channels), dtype=np.uint16)


def mpo(xmp: bytes | None = None) -> bytes:
    """A two-picture MPO; with an Ultra HDR XMP packet Pillow treats it as a plain JPEG again."""
    first, second = Image.fromarray(photo(620, 610, seed=9)), Image.fromarray(photo(620, 610, seed=10))
    params = {"xmp": xmp} if xmp else {}
    return encode(first, "MPO", save_all=True, append_images=[second], quality=85, **params)


# ----------------------------------------------------------------------------------------------
# Cases that must decode bit for bit

CASES: dict[str, Callable[[], bytes]] = {
    # JPEG: content, quality, chroma subsampling, progressive, grayscale
    "jpeg-noise-q75-420": lambda: jpeg(noise(160, 120), quality=75),
    "jpeg-photo-q95-444": lambda: jpeg(photo(500, 375), quality=95, subsampling=0),
    "jpeg-photo-q75-422": lambda: jpeg(photo(333, 517), quality=75, subsampling=1),
    "jpeg-photo-progressive": lambda: jpeg(photo(400, 300), quality=90, progressive=True),
    "jpeg-grayscale": lambda: encode(Image.fromarray(photo(310, 230)[..., 1]), "JPEG", quality=80),
    # JPEG: DCT draft ratios 2, 4 and 8 at size 75 (checked below); 2 and 4 at size 299
    "jpeg-draft-2": lambda: jpeg(photo(310, 300), quality=85),
    "jpeg-draft-4": lambda: jpeg(photo(640, 610), quality=85),
    "jpeg-draft-8": lambda: jpeg(photo(1250, 1210), quality=85, subsampling=0),
    "jpeg-draft-8-progressive": lambda: jpeg(photo(1300, 1220), quality=80, progressive=True),
    "jpeg-draft-4-at-299": lambda: jpeg(np.tile(photo(300, 300, seed=3), (8, 8, 1)), quality=80),
    # JPEG: odd and tiny sizes, upscaling
    "jpeg-1x1": lambda: jpeg(noise(1, 1)),
    "jpeg-3x500": lambda: jpeg(photo(3, 500)),
    "jpeg-500x3": lambda: jpeg(photo(500, 3)),
    "jpeg-97x53": lambda: jpeg(photo(97, 53)),
    "jpeg-211x127": lambda: jpeg(noise(211, 127)),
    "jpeg-upscale-40x30": lambda: jpeg(photo(40, 30)),
    # JPEG metadata: EXIF byte order, XMP orientation fallback, broken EXIF, MPO, Ultra HDR
    "jpeg-exif-big-endian-6": lambda: jpeg(photo(320, 200), exif=big_endian_exif(6)),
    "jpeg-xmp-orientation-attribute": lambda: jpeg(
        photo(320, 200), xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    ),
    "jpeg-xmp-orientation-element": lambda: jpeg(
        photo(320, 200), xmp=b"<x:xmpmeta><tiff:Orientation>8</tiff:Orientation></x:xmpmeta>"
    ),
    "jpeg-exif-wins-over-xmp": lambda: jpeg(
        photo(320, 200), exif=orientation_exif(1), xmp=b'<r tiff:Orientation="6"/>'
    ),
    "jpeg-broken-exif-no-transpose": lambda: jpeg(
        photo(320, 200), exif=b"Exif\x00\x00XX\x00\x00garbage", xmp=b'<r tiff:Orientation="6"/>'
    ),
    "jpeg-mpo-no-draft": lambda: mpo(),
    "jpeg-ultra-hdr-draft": lambda: mpo(xmp=b'<x:xmpmeta><rdf:Description hdrgm:Version="1.0"/></x:xmpmeta>'),
    # PNG: every colour type and bit depth
    "png-rgb": lambda: encode(Image.fromarray(photo(61, 47)), "PNG"),
    "png-rgba": lambda: encode(Image.fromarray(transparent_alpha(photo(61, 47))), "PNG"),
    "png-l": lambda: encode(Image.fromarray(photo(61, 47)[..., 0]), "PNG"),
    "png-la": lambda: encode(Image.fromarray(transparent_alpha(photo(61, 47)[..., :1]), "LA"), "PNG"),
    "png-palette": lambda: encode(Image.fromarray(photo(61, 47)).quantize(64), "PNG"),
    "png-palette-transparent-index": lambda: encode(Image.fromarray(photo(61, 47)).quantize(64), "PNG", transparency=5),
    "png-palette-alpha": palette_with_alpha_png,
    "png-l-trns": lambda: keyed_png("L"),
    "png-rgb-trns-ignored": lambda: keyed_png("RGB"),  # to_rgb returns mode RGB before looking at tRNS
    "png-1bit": lambda: encode(Image.fromarray(noise(45, 31, 1) > 127), "PNG"),
    "png-1bit-trns": lambda: png(noise(45, 31, 1) % 2, 0, 1, ((b"tRNS", b"\x00\x01"),)),
    "png-2bit-gray-trns": lambda: png(noise(45, 31, 1) % 4, 0, 2, ((b"tRNS", b"\x00\x01"),)),
    "png-4bit-gray": lambda: png(noise(45, 31, 1) % 16, 0, 4),
    "png-4bit-palette": lambda: png(noise(45, 31, 1) % 16, 3, 4, ((b"PLTE", bytes(noise(16, 1, 3, seed=2).ravel())),)),
    "png-4bit-palette-trns": lambda: png(
        noise(45, 31, 1) % 16, 3, 4, ((b"PLTE", bytes(noise(16, 1, 3, seed=2).ravel())), (b"tRNS", b"\x00\x40\xc0"))
    ),
    "png-16bit-gray": lambda: encode(Image.fromarray(sixteen_bit(53, 37, 1)[..., 0]), "PNG"),
    "png-16bit-gray-trns": lambda: png(sixteen_bit(53, 37, 1), 0, 16, ((b"tRNS", b"\x12\x34"),)),
    "png-16bit-la": lambda: png(sixteen_bit(53, 37, 2), 4, 16),
    "png-16bit-rgb": lambda: png(sixteen_bit(53, 37, 3), 2, 16),
    "png-16bit-rgb-trns-ignored": lambda: png(
        np.where(np.arange(37)[:, None, None] < 9, 0, sixteen_bit(53, 37, 3)), 2, 16, ((b"tRNS", b"\x00" * 6),)
    ),
    "png-16bit-rgba": lambda: png(sixteen_bit(53, 37, 4), 6, 16),
    "png-exif-orientation-6": lambda: encode(Image.fromarray(photo(64, 40)), "PNG", exif=orientation_exif(6)),
    "png-3x500": lambda: encode(Image.fromarray(photo(3, 500)), "PNG"),
    "png-500x3": lambda: encode(Image.fromarray(photo(500, 3)), "PNG"),
    "png-1x1": lambda: encode(Image.fromarray(noise(1, 1)), "PNG"),
    "png-downscale-1000x700": lambda: encode(Image.fromarray(noise(1000, 700)), "PNG", compress_level=1),
    # GIF: first frame, transparency onto white, gray palette, frame smaller than the screen
    "gif-palette": lambda: encode(Image.fromarray(photo(61, 47)).quantize(64), "GIF"),
    "gif-transparency": lambda: encode(Image.fromarray(photo(61, 47)).quantize(64), "GIF", transparency=3),
    "gif-animated": lambda: encode(
        Image.fromarray(photo(61, 47, seed=1)).quantize(32),
        "GIF",
        save_all=True,
        duration=80,
        append_images=[Image.fromarray(photo(61, 47, seed=s)).quantize(32) for s in (2, 3)],
    ),
    "gif-grayscale": lambda: encode(Image.fromarray(photo(61, 47)[..., 2]), "GIF"),
    "gif-offset-frame": lambda: gif_with_offset_frame(None),
    "gif-offset-frame-transparency": lambda: gif_with_offset_frame(7),
    # BMP: 24-bit, 32-bit (Pillow ignores the fourth byte), 8-bit palette and gray, top-down rows
    "bmp-24bit": lambda: encode(Image.fromarray(photo(61, 47)), "BMP"),
    "bmp-32bit": lambda: encode(Image.fromarray(transparent_alpha(photo(61, 47))), "BMP"),
    "bmp-8bit-palette": lambda: encode(Image.fromarray(photo(61, 47)).quantize(100), "BMP"),
    "bmp-8bit-gray": lambda: encode(Image.fromarray(photo(61, 47)[..., 0]), "BMP"),
    "bmp-top-down": top_down_bmp,
}


@functools.cache
def case_bytes(name: str) -> bytes:
    return CASES[name]()


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_graph_decoder_is_bit_exact(name: str, size: int) -> None:
    assert max_difference(case_bytes(name), size) == 0


@pytest.mark.parametrize("size", FAST_AT_75)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_bit_exact(orientation: int, size: int) -> None:
    data = jpeg(photo(640, 400, seed=orientation), quality=90, exif=orientation_exif(orientation))
    assert max_difference(data, size) == 0


def pillow_draft_scale(data: bytes, size: int) -> int:
    image = Image.open(io.BytesIO(data))
    width = image.size[0]
    image.draft(image.mode, (2 * size, 2 * size))
    return -(-width // image.size[0])


@pytest.mark.parametrize(
    "name, size, scale",
    [
        ("jpeg-draft-2", 75, 2),
        ("jpeg-draft-4", 75, 4),
        ("jpeg-draft-8", 75, 8),
        ("jpeg-draft-8", 299, 2),
        ("jpeg-draft-4-at-299", 299, 4),
    ],
)
def test_cases_cover_every_draft_ratio(name: str, size: int, scale: int) -> None:
    assert pillow_draft_scale(case_bytes(name), size) == scale


def test_mpo_cases_open_as_pillow_says() -> None:
    # decode_image drafts only format "JPEG": an MPO is decoded at full size, Ultra HDR is not.
    assert Image.open(io.BytesIO(case_bytes("jpeg-mpo-no-draft"))).format == "MPO"
    assert Image.open(io.BytesIO(case_bytes("jpeg-ultra-hdr-draft"))).format == "JPEG"


# ----------------------------------------------------------------------------------------------
# Measured bounds where exactness is impossible


@pytest.mark.parametrize("size", FAST_AT_75)
def test_cmyk_jpeg_is_within_one(size: int) -> None:
    # TensorFlow converts CMYK to RGB as c*k/255 truncated; Pillow rounds (see the module docstring).
    cmyk = np.random.default_rng(11).integers(0, 256, (180, 240, 4), dtype=np.uint8)
    cmyk[:, :120] = photo(120, 180, seed=11)[..., [0, 1, 2, 0]]
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=90)
    assert max_difference(data, size) == 1


# ----------------------------------------------------------------------------------------------
# Files the graph refuses, with a clear error


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not an image at all", id="garbage"),
        pytest.param(encode(Image.fromarray(photo(20, 20)), "TIFF"), id="tiff"),
        pytest.param(encode(Image.fromarray(photo(20, 20)), "WEBP"), id="webp"),
    ],
)
def test_unsupported_formats_raise(data: bytes) -> None:
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP"):
        graph_decode(data, 75)


def test_bmp_without_decoder_support_raises() -> None:
    data = encode(Image.fromarray(noise(20, 20, 1) > 127), "BMP")  # 1 bit per pixel
    decode_image(data, 75)  # Pillow reads it; tf.io.decode_bmp cannot
    with pytest.raises(tf.errors.InvalidArgumentError, match="BMP must be uncompressed"):
        graph_decode(data, 75)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    data = png(np.zeros((1, 1), np.uint8), 0, 8)
    data = data[:16] + struct.pack(">II", 20_000, 10_000) + data[24:]  # header claims 200 megapixels
    with pytest.raises(tf.errors.InvalidArgumentError, match="decompression bomb"):
        graph_decode(data, 75)


# ----------------------------------------------------------------------------------------------
# Serving


def test_scalar_api_runs_eagerly_too() -> None:
    data = case_bytes("jpeg-photo-q95-444")
    np.testing.assert_array_equal(decode_image_graph(tf.constant(data), 75).numpy(), decode_image(data, 75))


@pytest.mark.parametrize("seed", range(3))
def test_resize_matches_pillow_on_random_shapes(seed: int) -> None:
    # Pillow 13 picks the pass order from the shape: both orders and the single-pass cases occur here.
    rng = np.random.default_rng(seed)
    for _ in range(8):
        width, height = (int(v) for v in rng.choice([1, 2, 3, 74, 75, 76, 150, 299, 300, 301, 640, 1100], 2))
        pixels = noise(width, height, seed=int(rng.integers(1000)))
        for size in SIZES:
            expected = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
            np.testing.assert_array_equal(resize_bilinear_like_pillow(tf.constant(pixels), size).numpy(), expected)


def test_restored_saved_model_decodes_a_mixed_batch() -> None:
    batch = [case_bytes(name) for name in ("jpeg-exif-big-endian-6", "png-rgba", "gif-transparency", "bmp-24bit")]
    decoded = graph_decoder(SAVED_MODEL_SIZE)(tf.constant(batch)).numpy()
    assert decoded.shape == (len(batch), SAVED_MODEL_SIZE, SAVED_MODEL_SIZE, 3)
    for data, image in zip(batch, decoded):
        np.testing.assert_array_equal(image, decode_image(data, SAVED_MODEL_SIZE))
