"""Decode image bytes into the RGB pixels a backbone expects, robustly.

Any file Pillow can read becomes a (size, size, 3) uint8 array: EXIF orientation applied,
grayscale / palette / CMYK / 16-bit / float images converted to 8-bit RGB, transparency
composited onto white, animations reduced to their first frame. Anything else raises
`ImageDecodeError` with a one-line reason; nothing here ever raises another exception type.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bottleneck.errors import BottleneckError
from bottleneck.text import format_bytes

#: Twice Pillow's own warning threshold: about 179 megapixels, more than any camera makes.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

#: No image Pillow decodes for us stores more than 8 bytes a pixel uncompressed (16-bit RGBA); with room
#: for metadata, embedded previews and further frames, a file larger than `max_file_bytes` cannot be an
#: image within --max-pixels, and is refused before it is read (a 64 GB file would not fit in memory).
MAX_BYTES_PER_PIXEL = 8
FILE_SLACK_BYTES = 256 * 2**20


def max_file_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The largest file read as an image: 8 bytes a pixel of `max_pixels`, plus 256 MiB (1.6 GiB by default)."""
    return max_pixels * MAX_BYTES_PER_PIXEL + FILE_SLACK_BYTES


def too_large(size_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """The one-line reason a file of `size_bytes` is refused unread, or None if it may be read."""
    limit = max_file_bytes(max_pixels)
    if size_bytes <= limit:
        return None
    return (
        f"file of {format_bytes(size_bytes)} is larger than any image bottleneck decodes (limit {format_bytes(limit)}: "
        f"8 bytes a pixel of --max-pixels {max_pixels:,}, plus 256 MiB); not read"
    )


#: This decoder's version is `DECODE_VERSION`, kept with the fingerprint that records it (`backbones/spec.py`):
#: bump it there when decoding changes the pixels it produces.

_ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I;16S"})

#: Modules whose warnings are decoder noise: Pillow's plugins warn about damaged files.
PILLOW_MODULES = r"PIL\."


def set_pillow_warning_action(action: Literal["default", "always"]) -> None:
    """Give Pillow's warnings `action` ('default' or 'always'); bomb warnings stay ignored.

    An explicit action also overrides `-W error`: a warning about a damaged EXIF block or TIFF tag
    must not abort decoding a picture that is otherwise fine.
    """
    warnings.filterwarnings(action, module=PILLOW_MODULES)
    # Inserted last so it comes first: our own pixel limit is checked before decoding instead.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# Shown once per message, not discarded: `noise.decoder_noise_to` logs and counts every one.
set_pillow_warning_action("default")
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(BottleneckError):
    """One image could not be decoded; the message is the one-line reason recorded for it."""


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    array = array.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        array = array / 257.0
    elif mode == "F":
        array = array * 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else array
    else:  # 32-bit integers: 8- or 16-bit data stored wide, or arbitrary ranges
        peak = np.nanmax(array, initial=0.0)
        if peak > 65535:
            array = array * (255.0 / peak)
        elif peak > 255:
            array = array / 257.0
    return np.clip(np.nan_to_num(array), 0, 255).round().astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels become white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in image.info)
        or (mode in ("L", "RGB", "1") and "transparency" in image.info)
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image Pillow can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"refused as a decompression bomb: {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,} (--max-pixels)"
        )
    return image


def _load_upright(image: Image.Image, size: int) -> Image.Image:
    if image.format == "JPEG":
        # Let the JPEG decoder downscale by DCT scaling, keeping at least twice the target size.
        image.draft(image.mode, (2 * size, 2 * size))
    image.load()
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost us the picture
        return image


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"cannot decode: {text}" if len(text) < 200 else f"cannot decode: {text[:197]}..."


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a (size, size, 3) uint8 RGB array, or raise `ImageDecodeError`."""
    try:
        image = _open_checked(data, max_pixels)
        with image:
            upright = _load_upright(image, size)
            rgb = to_rgb(upright)
            resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(resized, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # hostile files raise anything: SyntaxError, struct.error, MemoryError...
        raise ImageDecodeError(_describe(exc)) from None


#: Why a path that is not a regular file (a FIFO, a device such as /dev/zero, a socket) is never read.
NOT_A_FILE = "not a regular file (a FIFO, device or socket): not read"


class UnreadableImage(BottleneckError):
    """A file that is not read at all: not a regular file, too large, or an OS error; the message says which."""


def read_image_file(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, tuple[int, int, int]]:
    """The bytes of an image file and its stamp (size, mtime_ns, inode), with every guard of the main path,
    or `UnreadableImage`.

    Opened non-blocking, so a FIFO put where an image was cannot stall a thread in open(); a file
    over the size limit is refused before reading, and never more than the limit is read, even
    from a file that grows as it is read. A path inside a tar shard (`.../shard.tar/name.jpg`,
    see `bottleneck.features.shards`) is that member, read with the same guards.
    """
    try:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except NotADirectoryError:  # a path through a regular file: a shard's member, or nothing
            return _read_member(path, max_pixels)
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UnreadableImage(NOT_A_FILE)
            _refuse_unread(st.st_size, max_pixels)  # before reading: a 64 GB file must not take the run down
            return _within_limit(handle.read(max_file_bytes(max_pixels) + 1), max_pixels), (
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
            )
    except OSError as exc:
        raise UnreadableImage(f"cannot read file: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte: no file can have that name
        raise UnreadableImage("cannot read file: its name holds a NUL byte") from None
    except MemoryError:
        raise UnreadableImage("cannot read file: it does not fit in memory now") from None


def _refuse_unread(size_bytes: int, max_pixels: int) -> None:
    refused = too_large(size_bytes, max_pixels)
    if refused:
        raise UnreadableImage(refused)


def _within_limit(data: bytes, max_pixels: int) -> bytes:
    if len(data) > max_file_bytes(max_pixels):
        raise UnreadableImage(too_large(len(data), max_pixels))
    return data


def _read_member(path: str | os.PathLike, max_pixels: int) -> tuple[bytes, tuple[int, int, int]]:
    from bottleneck.features.shards import member_of, read_member

    member = member_of(path)
    if member is None:
        raise UnreadableImage(f"cannot read file: {os.strerror(errno.ENOTDIR)} (nor a member of a tar shard)")
    _refuse_unread(member.size, max_pixels)
    return _within_limit(read_member(member, max_file_bytes(max_pixels)), max_pixels), member.stamp


def decode_image_file(path: str | os.PathLike, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read (with `read_image_file`'s guards) and decode one file, or raise `UnreadableImage` / `ImageDecodeError`."""
    data, _ = read_image_file(path, max_pixels)
    return decode_image(data, size, max_pixels)
