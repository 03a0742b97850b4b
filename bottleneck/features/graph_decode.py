"""Decode encoded image bytes inside a TensorFlow graph, pixel for pixel like `decode_image`.

An exported SavedModel takes encoded image bytes; its preprocessing has to produce exactly the
pixels `bottleneck.features.decode.decode_image` produced for training, or the classifier sees
slightly different inputs in production. Everything here is plain TensorFlow graph ops (no
py_function), so it is saved inside the SavedModel and runs under TF Serving. The steps of
`decode_image`, in its order:

1. Sniff the format from the magic bytes (JPEG, PNG, GIF, BMP). Anything else, and a picture
   over `DEFAULT_MAX_PIXELS`, fails with tf.errors.InvalidArgumentError naming the reason.
2. JPEG: walk the markers like Pillow's JpegImageFile; decode at the DCT scale Pillow's `draft`
   picks (none for multi-picture MPO files, which Pillow opens as format "MPO"), with libjpeg's
   ISLOW IDCT and fancy upsampling, Pillow's defaults.
3. EXIF orientation (JPEG APP1 "Exif", PNG eXIf, and for JPEG the XMP `tiff:Orientation`
   fallback of Image.getexif): IFD0 tag 0x0112 read like Pillow's TIFF directory reader, then
   the eight transposes of `ImageOps.exif_transpose`.
4. `to_rgb`: palette and gray expanded; 16-bit gray scaled by 1/257 and rounded; other 16-bit
   samples cut to their high byte (Pillow's ";16B" raw modes); a gray tRNS key made white the
   way Pillow compares it; RGB returned as it is (to_rgb ignores an RGB tRNS key); alpha
   composited onto white with Pillow's paste arithmetic DIV255(255 * (255 - a) + c * a),
   DIV255(v) = (((v + 128) >> 8) + v + 128) >> 8.
5. Resize with Pillow's BILINEAR (libImaging/Resample.c): coefficients in float64 in Pillow's
   operation and summation order, rounded to 22-bit fixed point, the few taps of each output
   pixel gathered and accumulated in int32 like Pillow's C loop, uint8 between the passes. The
   pass order follows the installed Pillow: from Pillow 13 on (python-pillow/Pillow#9549) the
   vertical pass comes first when the height shrinks by more than twice as many pixels as the
   width, and the order changes the rounding.

Bit-exact with `decode_image` (tests/test_graph_decode.py): baseline and progressive JPEG
(4:2:0, 4:2:2, 4:4:4, grayscale) at every draft scale, every EXIF orientation, XMP orientation,
MPO and Ultra HDR files; PNG of every colour type and bit depth (1/2/4/8/16-bit gray, RGB,
palette, gray+alpha, RGBA, tRNS keys and palette alpha); GIF first frames (transparency, gray
palettes, frames smaller than the screen); uncompressed 24/32-bit and 8-bit palette BMP.

Not bit-exact, measured:
- CMYK/YCCK JPEG: TensorFlow converts CMYK to RGB itself, c*k/255 truncated, where Pillow
  rounds (MULDIV255), and TensorFlow cannot return the CMYK samples. Max abs difference 1.

Not reproduced (rare or malformed files): an orientation stored with a non-integer TIFF type; a
second EXIF APP1 segment, which Pillow appends to the first; XMP orientation in PNG text chunks
("XML:com.adobe.xmp", "Raw profile type exif"); CMYK JPEG without an Adobe marker (Pillow
assumes inverted CMYK); GIF palettes shorter than the indices used; BMP with RLE or bit-field
compression or 1/4/16-bit pixels, and WebP, TIFF and other formats Pillow reads: these raise.

TensorFlow decoder quirks worked around here: tf.io.decode_png fills a missing alpha channel
with the bit depth's maximum (15 for a 4-bit palette) instead of 255; tf.io.decode_gif blacks
out transparent pixels and crops the screen to the first frame; tf.io.decode_bmp returns the
indices of 8-bit BMPs. tf.io.decode_webp is deliberately never called: in TensorFlow 2.21 it
corrupts the heap and aborts the process on an animated WebP.
"""

from __future__ import annotations

from typing import Any, Callable

from bottleneck.features.decode import DEFAULT_MAX_PIXELS

Tensor = Any  # a tf.Tensor; TensorFlow itself is imported lazily, inside the functions

_PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling: 32 - 8 - 2
_JPEG, _PNG, _GIF, _BMP = 0, 1, 2, 3
_ORIENTATION_TAG = 0x0112
_MPF_NUMBER_OF_IMAGES_TAG = 0xB001
_MPF_ENTRIES_TAG = 0xB002
# Pillow's TIFF types whose single value reads back as a Python int (BYTE reads as bytes).
_INTEGER_TIFF_TYPES = (3, 4, 6, 8, 9, 13)
# Unit size of every TIFF type Pillow can load; entries of other types are skipped.
_TIFF_UNIT_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_XMP_NAMESPACE = b"http://ns.adobe.com/xap/1.0/\x00"


def decode_image_graph(contents: Tensor, size: int) -> Tensor:
    """A scalar tf.string of encoded image bytes -> (size, size, 3) tf.uint8, equal to decode_image(bytes, size).

    Raises tf.errors.InvalidArgumentError (at run time) for what the graph cannot decode.
    """
    import tensorflow as tf

    # Plain graph construction: AutoGraph has nothing to convert here and would triple the tracing time.
    return tf.autograph.experimental.do_not_convert(_decode_one)(contents, size)


def decode_batch_graph(contents: Tensor, size: int) -> Tensor:
    """A (n,) tf.string batch -> (n, size, size, 3) tf.uint8 (tf.map_fn over decode_image_graph)."""
    import tensorflow as tf

    return tf.map_fn(
        tf.autograph.experimental.do_not_convert(lambda one: _decode_one(one, size)),
        tf.convert_to_tensor(contents, dtype=tf.string),
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
    )


def _decode_one(contents: Tensor, size: int) -> Tensor:
    import tensorflow as tf

    contents = tf.convert_to_tensor(contents, dtype=tf.string)
    reader = _ByteReader(contents)
    branches = {
        _JPEG: lambda: _decode_jpeg(reader, contents, size),
        _PNG: lambda: _decode_png(reader, contents),
        _GIF: lambda: _decode_gif(reader, contents),
        _BMP: lambda: _decode_bmp(reader, contents),
    }
    upright_rgb = tf.switch_case(
        _sniff_format(reader), branch_fns=branches, default=lambda: _unsupported_format(reader)
    )
    resized = resize_bilinear_like_pillow(upright_rgb, size)
    return tf.ensure_shape(resized, [size, size, 3])


# ----------------------------------------------------------------------------------------------
# Reading bytes


class _ByteReader:
    """Bounds-safe reads of one file's bytes in the graph.

    Positions are int64 tensors of any shape; bytes outside the file read as 0.
    """

    def __init__(self, contents: Tensor) -> None:
        import tensorflow as tf

        raw = tf.io.decode_raw(contents, tf.uint8)
        self.length = tf.size(raw, out_type=tf.int64)
        # A zero byte at index `length` stands in for every read outside the file, even of an empty one.
        self._data = tf.concat([raw, tf.zeros([1], tf.uint8)], axis=0)

    def bytes_at(self, position: Tensor, count: int) -> Tensor:
        """int64 bytes position..position+count-1, in a new last axis."""
        import tensorflow as tf

        index = tf.cast(position, tf.int64)[..., None] + tf.range(count, dtype=tf.int64)
        index = tf.where((index >= 0) & (index < self.length), index, self.length)
        return tf.cast(tf.gather(self._data, index), tf.int64)

    def u8(self, position: Tensor) -> Tensor:
        return self.bytes_at(position, 1)[..., 0]

    def uint(self, position: Tensor, count: int, little: Tensor | bool) -> Tensor:
        import tensorflow as tf

        return tf.reduce_sum(self.bytes_at(position, count) * _place_values(count, little), axis=-1)

    def u16(self, position: Tensor, little: Tensor | bool) -> Tensor:
        return self.uint(position, 2, little)

    def u32(self, position: Tensor, little: Tensor | bool) -> Tensor:
        return self.uint(position, 4, little)

    def starts_with(self, position: Tensor, prefix: bytes) -> Tensor:
        import tensorflow as tf

        return tf.reduce_all(tf.equal(self.bytes_at(position, len(prefix)), list(prefix)), axis=-1)

    def pattern_hits(self, start: Tensor, end: Tensor, pattern: bytes) -> tuple[Tensor, Tensor]:
        """Positions start..end-1 and whether `pattern` begins at each (it may run past end)."""
        import tensorflow as tf

        start, end = tf.cast(start, tf.int64), tf.cast(end, tf.int64)
        positions = tf.range(start, tf.maximum(start, end), dtype=tf.int64)
        return positions, self.starts_with(positions, pattern)


def _place_values(count: int, little: Tensor | bool) -> Tensor:
    """Weights that turn `count` bytes into an unsigned integer in the given byte order."""
    import tensorflow as tf

    values = [256**i for i in range(count)]
    return _select(little, tf.constant(values, tf.int64), tf.constant(values[::-1], tf.int64))


def _i64(value: int) -> Tensor:
    import tensorflow as tf

    return tf.constant(value, tf.int64)


def _select(condition: Tensor | bool, if_true: Tensor, if_false: Tensor) -> Tensor:
    import tensorflow as tf

    if isinstance(condition, bool):
        return if_true if condition else if_false
    return tf.where(condition, if_true, if_false)


def _first_true(flags: Tensor) -> Tensor:
    """Index of the first True in a bool vector, or -1."""
    import tensorflow as tf

    # A trailing True keeps argmax defined on an empty vector; it only answers when nothing else does.
    padded = tf.concat([flags, [True]], axis=0)
    index = tf.argmax(tf.cast(padded, tf.int32), output_type=tf.int64)
    return tf.where(tf.reduce_any(flags), index, tf.constant(-1, tf.int64))


def _last_true(flags: Tensor) -> Tensor:
    """Index of the last True in a bool vector, or -1."""
    import tensorflow as tf

    from_end = _first_true(tf.reverse(flags, [0]))
    return tf.where(from_end >= 0, tf.size(flags, out_type=tf.int64) - 1 - from_end, from_end)


def _fail_unless(condition: Tensor, message: str) -> Tensor:
    import tensorflow as tf

    return tf.debugging.Assert(condition, [tf.constant(message)])


def _check_pixel_count(width: Tensor, height: Tensor) -> Tensor:
    """decode_image refuses pictures over DEFAULT_MAX_PIXELS before decoding; so does the graph."""
    import tensorflow as tf

    pixels = tf.cast(width, tf.int64) * tf.cast(height, tf.int64)
    return _fail_unless(
        pixels <= DEFAULT_MAX_PIXELS,
        f"refused as a decompression bomb: over the limit of {DEFAULT_MAX_PIXELS:,} pixels",
    )


def _sniff_format(reader: _ByteReader) -> Tensor:
    """Pillow identifies these formats by their first bytes, whatever the file name says."""
    import tensorflow as tf

    checks = [
        (_JPEG, reader.starts_with(0, b"\xff\xd8\xff")),
        (_PNG, reader.starts_with(0, b"\x89PNG\r\n\x1a\n")),
        (_GIF, reader.starts_with(0, b"GIF87a") | reader.starts_with(0, b"GIF89a")),
        (_BMP, reader.starts_with(0, b"BM")),
    ]
    kind = tf.constant(-1, tf.int32)
    for code, matches in reversed(checks):
        kind = tf.where(matches, tf.constant(code, tf.int32), kind)
    return kind


def _unsupported_format(reader: _ByteReader) -> Tensor:
    import tensorflow as tf

    message = "graph decoder: not a JPEG, PNG, GIF or BMP file (empty, corrupt, or a format it cannot decode)"
    with tf.control_dependencies([_fail_unless(tf.constant(False), message)]):
        return tf.zeros([1, 1, 3], tf.uint8)


def _replace_bytes_if(
    condition: Tensor, contents: Tensor, position: Tensor, replacement: Tensor, length: int
) -> Tensor:
    """contents with `length` bytes at `position` replaced by the string `replacement`, if condition."""
    import tensorflow as tf

    def replaced() -> Tensor:
        head = tf.strings.substr(contents, 0, tf.cast(position, tf.int32))
        tail = tf.strings.substr(contents, tf.cast(position, tf.int32) + length, -1)
        return tf.strings.join([head, replacement, tail])

    return tf.cond(condition, replaced, lambda: contents)


def _byte_string(value: Tensor) -> Tensor:
    """A one-byte tf.string holding the integer `value` (0..255)."""
    import tensorflow as tf

    table = tf.constant([bytes([byte]) for byte in range(256)])
    return tf.gather(table, tf.cast(value, tf.int32))


# ----------------------------------------------------------------------------------------------
# TIFF directories (EXIF, MPF)


def _tiff_block(reader: _ByteReader, start: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """Skip up to two "Exif\\0\\0" prefixes, as Pillow's Exif.load does."""
    import tensorflow as tf

    for _ in range(2):
        prefixed = (length >= 6) & reader.starts_with(start, b"Exif\x00\x00")
        start = tf.where(prefixed, start + 6, start)
        length = tf.where(prefixed, length - 6, length)
    return start, length


def _tiff_header(reader: _ByteReader, start: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """(valid, little-endian) for an 8-byte header Pillow's ImageFileDirectory_v2 accepts (BigTIFF is not)."""
    import tensorflow as tf

    prefixes = [list(prefix) for prefix in (b"II*\x00", b"MM\x00*", b"II\x00*", b"MM*\x00")]
    head = reader.bytes_at(start, 4)
    accepted = tf.reduce_any(tf.reduce_all(tf.equal(head[None, :], prefixes), axis=-1))
    return (length >= 8) & accepted, tf.equal(head[0], ord("I"))


def _ifd0_entries(
    reader: _ByteReader, start: Tensor, length: Tensor, tags: tuple[int, ...]
) -> dict[int, dict[str, Tensor]]:
    """The IFD0 entry for each tag that Pillow's directory reader would store, if any.

    Pillow reads entries until the block ends (keeping those read), skips unknown types,
    zero-length values and out-of-line values beyond the block, and keeps the first entry
    of a tag. Offsets are relative to the TIFF header at `start`.
    """
    import tensorflow as tf

    valid, little = _tiff_header(reader, start, length)
    ifd = reader.u32(start + 4, little)
    valid &= ifd + 2 <= length
    declared = reader.u16(start + ifd, little)
    readable = tf.where(valid, tf.clip_by_value((length - ifd - 2) // 12, 0, declared), 0)
    entries = start + ifd + 2 + 12 * tf.range(readable, dtype=tf.int64)
    fields = reader.bytes_at(entries, 12)  # tag, type, count, value or offset

    def field(offset: int, count: int) -> Tensor:
        return tf.reduce_sum(fields[:, offset : offset + count] * _place_values(count, little), axis=-1)

    unit_table = tf.constant([_TIFF_UNIT_SIZES.get(kind, 0) for kind in range(17)], tf.int64)
    tags_read, types, counts, offsets = field(0, 2), field(2, 2), field(4, 4), field(8, 4)
    sizes = counts * tf.gather(unit_table, tf.clip_by_value(types, 0, 16)) * tf.cast(types <= 16, tf.int64)
    usable = (sizes > 0) & ((sizes <= 4) | (offsets + sizes <= length))
    found = {}
    for tag in tags:
        index = _first_true(tf.equal(tags_read, tag) & usable)
        entry = _pick(entries, index, -1)
        found[tag] = {
            "found": index >= 0,
            "little": little,
            "type": _pick(types, index, 0),
            "count": _pick(counts, index, 0),
            "inline_value": entry + 8,
            "data": tf.where(_pick(sizes, index, 0) <= 4, entry + 8, start + _pick(offsets, index, 0)),
        }
    return found


def _pick(vector: Tensor, index: Tensor, default: int) -> Tensor:
    """vector[index], or `default` when index is -1 (the vector may be empty)."""
    import tensorflow as tf

    padded = tf.concat([vector, tf.constant([default], vector.dtype)], axis=0)
    return tf.gather(padded, tf.where(index >= 0, index, tf.size(vector, out_type=tf.int64)))


def _integer_value(reader: _ByteReader, entry: dict[str, Tensor]) -> Tensor:
    """The entry's value when Pillow would read it as a single int (integer TIFF types), else -1."""
    import tensorflow as tf

    kind, little = entry["type"], entry["little"]
    value_widths = tf.constant([0, 0, 0, 2, 4, 0, 1, 0, 2, 4, 0, 0, 0, 4], tf.int64)  # by TIFF type
    width = tf.gather(value_widths, tf.clip_by_value(kind, 0, 13))
    signed = tf.equal(kind, 6) | tf.equal(kind, 8) | tf.equal(kind, 9)
    # Values sit left-aligned in the 4-byte field: read all four, then drop the unused bytes.
    raw = reader.u32(entry["inline_value"], little)
    low_bytes = raw % tf.bitwise.left_shift(_i64(1), 8 * width)
    value = tf.where(little, low_bytes, tf.bitwise.right_shift(raw, 8 * (4 - width)))
    sign_bit = tf.bitwise.left_shift(_i64(1), tf.maximum(8 * width - 1, 0))
    value = tf.where(signed & (value >= sign_bit), value - 2 * sign_bit, value)
    integer = tf.reduce_any(tf.equal(kind, list(_INTEGER_TIFF_TYPES))) & (width > 0)
    return tf.where(entry["found"] & tf.equal(entry["count"], 1) & integer, value, -1)


def _exif_orientation(reader: _ByteReader, start: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """(orientation or -1, tag present) from a TIFF block; a bad header means no transpose at all.

    Pillow raises on a bad header (exif_transpose fails, decode_image keeps the image as is),
    so the XMP fallback only applies when the header is fine and the tag is absent.
    """
    import tensorflow as tf

    start, length = _tiff_block(reader, start, length)
    present = length > 0
    header_valid, _ = _tiff_header(reader, start, length)
    entry = _ifd0_entries(reader, start, length, (_ORIENTATION_TAG,))[_ORIENTATION_TAG]
    orientation = tf.where(present & header_valid, _integer_value(reader, entry), -1)
    blocks_fallback = present & (~header_valid | entry["found"])
    return orientation, blocks_fallback


def _apply_orientation(image: Tensor, orientation: Tensor) -> Tensor:
    """The transposes of ImageOps.exif_transpose: Pillow's ROTATE_270 turns clockwise."""
    import tensorflow as tf

    def swap_axes() -> Tensor:
        return tf.transpose(image, [1, 0, 2])

    branches = [
        lambda: image,  # 1 and anything unknown
        lambda: tf.reverse(image, [1]),  # 2: FLIP_LEFT_RIGHT
        lambda: tf.reverse(image, [0, 1]),  # 3: ROTATE_180
        lambda: tf.reverse(image, [0]),  # 4: FLIP_TOP_BOTTOM
        swap_axes,  # 5: TRANSPOSE
        lambda: tf.reverse(swap_axes(), [1]),  # 6: ROTATE_270
        lambda: tf.reverse(swap_axes(), [0, 1]),  # 7: TRANSVERSE
        lambda: tf.reverse(swap_axes(), [0]),  # 8: ROTATE_90
    ]
    known = (orientation >= 2) & (orientation <= 8)
    index = tf.cast(tf.where(known, orientation - 1, 0), tf.int32)
    return tf.switch_case(index, branches)


# ----------------------------------------------------------------------------------------------
# JPEG


def _jpeg_segments(reader: _ByteReader) -> dict[str, Tensor]:
    """Walk the markers up to the first SOS like Pillow's JpegImageFile._open.

    Returns (payload start, payload length) of the first APP1 "Exif" segment, the last APP1
    XMP packet (after its namespace) and the last APP2 "MPF" block, -1 where absent, and
    where the scan starts. The walk only collects positions; they are classified together.
    """
    import tensorflow as tf

    def marker_kind(head: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(marker, segment with a length, start of scan) for bytes read at walk positions."""
        code = head[..., 1]
        marker = tf.equal(head[..., 0], 0xFF) & tf.not_equal(code, 0xFF) & tf.not_equal(code, 0x00)
        standalone = tf.equal(code, 0x01) | ((code >= 0xD0) & (code <= 0xD9))
        scan = marker & tf.equal(code, 0xDA)
        return marker, marker & ~standalone & ~scan, scan

    def advance(pos: Tensor) -> tuple[Tensor, Tensor]:
        head = reader.bytes_at(pos, 4)
        marker, segment, scan = marker_kind(head)
        step = tf.where(segment, 2 + _big_endian(head[2:4]), tf.where(marker, _i64(2), _i64(1)))
        return pos + step, scan

    positions = _walk_positions(2, advance, reader.length)
    head = reader.bytes_at(positions, 4 + len(_XMP_NAMESPACE))
    _, segment, scan = marker_kind(head)
    payload_lengths = _big_endian(head[:, 2:4]) - 2

    def payload_starts_with(prefix: bytes) -> Tensor:
        return tf.reduce_all(tf.equal(head[:, 4 : 4 + len(prefix)], list(prefix)), axis=1)

    def located(index: Tensor, skip: int) -> tuple[Tensor, Tensor]:
        start = tf.where(index >= 0, _pick(positions, index, -1) + 4 + skip, _i64(-1))
        return start, tf.where(index >= 0, _pick(payload_lengths, index, 0) - skip, _i64(0))

    app1 = segment & tf.equal(head[:, 1], 0xE1)
    app2 = segment & tf.equal(head[:, 1], 0xE2)
    exif, exif_length = located(_first_true(app1 & payload_starts_with(b"Exif\x00\x00")), 0)
    xmp, xmp_length = located(_last_true(app1 & payload_starts_with(_XMP_NAMESPACE)), len(_XMP_NAMESPACE))
    mpf, mpf_length = located(_last_true(app2 & payload_starts_with(b"MPF\x00")), 4)
    scan_index = _last_true(scan)
    return {
        "exif": exif,
        "exif_length": exif_length,
        "xmp": xmp,
        "xmp_length": xmp_length,
        "mpf": mpf,
        "mpf_length": mpf_length,
        "scan": tf.where(scan_index >= 0, _pick(positions, scan_index, 0), reader.length),
    }


def _walk_positions(start: int, advance: Callable[[Tensor], tuple[Tensor, Tensor]], end: Tensor) -> Tensor:
    """Positions a sequential walk visits, from `start` until `advance` says stop or `end` is reached.

    The loop body stays tiny (one read, a few ops): what each position holds is worked out
    afterwards, for all positions at once.
    """
    import tensorflow as tf

    def step(pos: Tensor, visited: Any, stop: Tensor) -> tuple[Tensor, Any, Tensor]:
        next_pos, stop = advance(pos)
        return next_pos, visited.write(visited.size(), pos), stop

    def more(pos: Tensor, visited: Any, stop: Tensor) -> Tensor:
        return ~stop & (pos < end)

    visited = tf.TensorArray(tf.int64, size=0, dynamic_size=True, element_shape=tf.TensorShape([]))
    _, visited, _ = tf.while_loop(more, step, (_i64(start), visited, tf.constant(False)))
    return visited.stack()


def _big_endian(byte_values: Tensor) -> Tensor:
    """Unsigned big-endian integers from int64 bytes in the last axis (2 or 4 of them)."""
    import tensorflow as tf

    return tf.reduce_sum(byte_values * _place_values(byte_values.shape[-1], False), axis=-1)


def _xmp_orientation(reader: _ByteReader, start: Tensor, length: Tensor) -> Tensor:
    """The digit Pillow's re.search(rb'tiff:Orientation(="|>)([0-9])') finds in the XMP packet, or -1."""
    import tensorflow as tf

    prefix = b"tiff:Orientation"
    end = tf.where(start >= 0, start + length, start)
    positions, hits = reader.pattern_hits(start, end, prefix)
    after = positions + len(prefix)
    first, second, third = reader.u8(after), reader.u8(after + 1), reader.u8(after + 2)

    def is_digit(value: Tensor) -> Tensor:
        return (value >= ord("0")) & (value <= ord("9"))

    quoted = tf.equal(first, ord("=")) & tf.equal(second, ord('"')) & is_digit(third) & (after + 3 <= end)
    element = tf.equal(first, ord(">")) & is_digit(second) & (after + 2 <= end)
    index = _first_true(hits & (quoted | element))
    digit = _pick(tf.where(quoted, third, second), index, ord("0") - 1)
    return tf.where(index >= 0, digit - ord("0"), -1)


def _jpeg_orientation(reader: _ByteReader, segments: dict[str, Tensor]) -> Tensor:
    import tensorflow as tf

    orientation, blocks_fallback = _exif_orientation(reader, segments["exif"], segments["exif_length"])
    from_xmp = _xmp_orientation(reader, segments["xmp"], segments["xmp_length"])
    return tf.where(blocks_fallback, orientation, from_xmp)


def _is_mpo(reader: _ByteReader, segments: dict[str, Tensor]) -> Tensor:
    """Whether Pillow opens the file as MPO (format "MPO", which decode_image does not draft).

    Pillow's jpeg_factory: an MPF index whose number of images is above 1 with a readable
    16-byte entry per image, every one a JPEG, unless an APP1 segment marks Ultra HDR.
    """
    import tensorflow as tf

    start, length = segments["mpf"], segments["mpf_length"]
    entries = _ifd0_entries(reader, start, length, (_MPF_NUMBER_OF_IMAGES_TAG, _MPF_ENTRIES_TAG))
    images = _integer_value(reader, entries[_MPF_NUMBER_OF_IMAGES_TAG])
    table = entries[_MPF_ENTRIES_TAG]
    bytes_type = tf.equal(table["type"], 7) | tf.equal(table["type"], 1)
    readable = table["found"] & bytes_type & (table["count"] >= 16 * tf.maximum(images, 0))
    listed = tf.where(readable, tf.clip_by_value(images, 0, table["count"] // 16), 0)
    attributes = reader.u32(table["data"] + 16 * tf.range(listed, dtype=tf.int64), table["little"])
    all_jpeg = tf.reduce_all(tf.equal((attributes // 2**24) % 8, 0))
    _, hdr_hits = reader.pattern_hits(0, segments["scan"], b' hdrgm:Version="')
    ultra_hdr = tf.reduce_any(hdr_hits)
    return (start >= 0) & (images > 1) & readable & all_jpeg & ~ultra_hdr


def _pillow_draft_scale(width: Tensor, height: Tensor, size: int) -> Tensor:
    """JpegImageFile.draft(mode, (2*size, 2*size)): the largest of 8, 4, 2, 1 up to min(w, h) // (2*size)."""
    import tensorflow as tf

    room = tf.minimum(width // (2 * size), height // (2 * size))
    return tf.where(room >= 8, 8, tf.where(room >= 4, 4, tf.where(room >= 2, 2, 1)))


def _decode_jpeg(reader: _ByteReader, contents: Tensor, size: int) -> Tensor:
    import tensorflow as tf

    height, width = tf.unstack(tf.io.extract_jpeg_shape(contents)[:2])
    segments = _jpeg_segments(reader)
    scale = tf.where(_is_mpo(reader, segments), 1, _pillow_draft_scale(width, height, size))

    def decode_at(ratio: int) -> Callable[[], Tensor]:
        # Pillow's JPEG decoder: libjpeg defaults (ISLOW IDCT, fancy upsampling), scale 1/ratio.
        return lambda: tf.io.decode_jpeg(
            contents, channels=3, ratio=ratio, fancy_upscaling=True, dct_method="INTEGER_ACCURATE"
        )

    branch = tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))
    with tf.control_dependencies([_check_pixel_count(width, height)]):
        image = tf.switch_case(branch, [decode_at(1), decode_at(2), decode_at(4), decode_at(8)])
    return _apply_orientation(image, _jpeg_orientation(reader, segments))


# ----------------------------------------------------------------------------------------------
# PNG


def _png_chunks(reader: _ByteReader) -> dict[str, Tensor]:
    """Walk the chunks to IEND: where the tRNS and eXIf payloads are (last one wins, as in Pillow)."""
    import tensorflow as tf

    trns_type, exif_type, end_type = (int.from_bytes(name, "big") for name in (b"tRNS", b"eXIf", b"IEND"))

    def advance(pos: Tensor) -> tuple[Tensor, Tensor]:
        head = reader.bytes_at(pos, 8)
        return pos + 12 + _big_endian(head[:4]), tf.equal(_big_endian(head[4:]), end_type)

    positions = _walk_positions(8, advance, reader.length - 7)
    head = reader.bytes_at(positions, 8)
    lengths, kinds = _big_endian(head[:, :4]), _big_endian(head[:, 4:])

    def payload(kind: int) -> tuple[Tensor, Tensor]:
        index = _last_true(tf.equal(kinds, kind))
        return tf.where(index >= 0, _pick(positions, index, -1) + 8, _i64(-1)), _pick(lengths, index, 0)

    (trns, trns_length), (exif, exif_length) = payload(trns_type), payload(exif_type)
    return {"trns": trns, "trns_length": trns_length, "exif": exif, "exif_length": exif_length}


def _composite_on_white(rgba: Tensor) -> Tensor:
    """Pillow's paste(rgba, mask=alpha) onto white: DIV255(255 * (255 - a) + c * a) per channel."""
    import tensorflow as tf

    values = tf.cast(rgba, tf.int32)
    colour, alpha = values[..., :3], values[..., 3:]
    blended = 255 * (255 - alpha) + colour * alpha + 128
    return tf.cast(tf.bitwise.right_shift(tf.bitwise.right_shift(blended, 8) + blended, 8), tf.uint8)


def _png_samples(contents: Tensor, channels: int, sixteen_bit: Tensor) -> Tensor:
    """uint8 samples; Pillow reads 16-bit RGB/RGBA/LA samples by their high byte (";16B" raw modes)."""
    import tensorflow as tf

    def high_bytes() -> Tensor:
        wide = tf.io.decode_png(contents, channels=channels, dtype=tf.uint16)
        return tf.cast(tf.bitwise.right_shift(wide, 8), tf.uint8)

    return tf.cond(sixteen_bit, high_bytes, lambda: tf.io.decode_png(contents, channels=channels))


def _png_gray16(contents: Tensor) -> Tensor:
    """Mode I;16 -> 8 bit as to_rgb does: round(v / 257), never a tie since 257 is odd; tRNS ignored."""
    import tensorflow as tf

    wide = tf.cast(tf.io.decode_png(contents, channels=1, dtype=tf.uint16), tf.int32)
    gray = tf.cast((2 * wide + 257) // 514, tf.uint8)
    return tf.tile(gray, [1, 1, 3])


def _png_gray_key(reader: _ByteReader, contents: Tensor, chunks: dict[str, Tensor], depth: Tensor) -> Tensor:
    """1/2/4/8-bit gray with an optional tRNS key, keyed the way Pillow does it.

    Pillow compares the 8-bit pixels with the raw tRNS value (1-bit keys become 0 or 255, a
    2- or 4-bit key is not rescaled) and composites equal pixels, fully transparent, to white.
    """
    import tensorflow as tf

    gray = tf.io.decode_png(contents, channels=3)
    start, length = chunks["trns"], chunks["trns_length"]
    key = reader.u16(start, little=False)
    key = tf.where(tf.equal(depth, 1), _i64(255) * tf.cast(key > 0, tf.int64), key)
    keyed = (start >= 0) & (length >= 2)
    transparent = keyed & tf.equal(tf.cast(gray[..., :1], tf.int64), key)
    return tf.where(transparent, tf.constant(255, tf.uint8), gray)


def _decode_png(reader: _ByteReader, contents: Tensor) -> Tensor:
    import tensorflow as tf

    width, height = reader.u32(16, little=False), reader.u32(20, little=False)
    depth, colour_type = reader.u8(24), reader.u8(25)
    chunks = _png_chunks(reader)
    sixteen_bit = tf.equal(depth, 16)
    gray, palette = tf.equal(colour_type, 0), tf.equal(colour_type, 3)
    # to_rgb returns mode RGB as it is (a tRNS colour key included) and composites only real alpha.
    # A palette without tRNS is read as RGB: tf.io.decode_png fills a missing alpha channel with
    # the bit depth's maximum (15 for a 4-bit palette), not 255.
    opaque_colour = tf.equal(colour_type, 2) | (palette & (chunks["trns"] < 0))
    branch = tf.where(gray & sixteen_bit, 0, tf.where(gray, 1, tf.where(opaque_colour, 2, 3)))
    with tf.control_dependencies([_check_pixel_count(width, height)]):
        image = tf.switch_case(
            branch,
            [
                lambda: _png_gray16(contents),
                lambda: _png_gray_key(reader, contents, chunks, depth),
                lambda: _png_samples(contents, 3, sixteen_bit),
                # Palette with tRNS (alpha per index), gray+alpha and RGBA.
                lambda: _composite_on_white(_png_samples(contents, 4, sixteen_bit)),
            ],
        )
    orientation, _ = _exif_orientation(reader, chunks["exif"], chunks["exif_length"])
    return _apply_orientation(image, orientation)


# ----------------------------------------------------------------------------------------------
# GIF


def _gif_first_frame_blocks(reader: _ByteReader, first_block: Tensor) -> dict[str, Tensor]:
    """Walk the blocks before the first image like Pillow's GifImageFile._seek(0).

    Returns the image descriptor's position, the first graphic control extension (the one
    TensorFlow's decoder applies) and the transparent index Pillow uses (last GCE with the
    transparency flag), -1 where absent.
    """
    import tensorflow as tf

    missing = tf.constant(-1, tf.int64)

    def step(pos, in_sub_blocks, descriptor, first_gce, transparent, done):
        byte = reader.u8(pos)
        extension = ~in_sub_blocks & tf.equal(byte, 0x21)
        image = ~in_sub_blocks & tf.equal(byte, 0x2C)
        trailer = ~in_sub_blocks & (tf.equal(byte, 0x3B) | (pos >= reader.length))
        control = extension & tf.equal(reader.u8(pos + 1), 0xF9)
        flagged = control & tf.equal(reader.u8(pos + 3) % 2, 1)
        sub_blocks_end = in_sub_blocks & tf.equal(byte, 0)
        next_pos = tf.where(extension, pos + 2, tf.where(in_sub_blocks, pos + 1 + byte, pos + 1))
        return (
            tf.where(image, pos, next_pos),
            tf.where(extension, True, tf.where(sub_blocks_end, False, in_sub_blocks)),
            tf.where(image, pos, descriptor),
            tf.where(control & (first_gce < 0), pos, first_gce),
            tf.where(flagged, reader.u8(pos + 6), transparent),
            image | trailer,
        )

    def more(*state):
        return ~state[-1]

    start = (first_block, tf.constant(False), missing, missing, missing, tf.constant(False))
    _, _, descriptor, first_gce, transparent, _ = tf.while_loop(more, step, start)
    return {"descriptor": descriptor, "first_gce": first_gce, "transparent": transparent}


def _decode_gif(reader: _ByteReader, contents: Tensor) -> Tensor:
    """Frame 0 as Pillow composes it: P/L pixels on the screen, transparency and uncovered area white.

    tf.io.decode_gif blacks out transparent pixels and crops the screen to frame 0, so the
    bytes are patched first: frame 0 moved to (0, 0), the transparency flag of the GCE that
    TensorFlow reads cleared, and the transparent palette entry made white. The frame is then
    placed on Pillow's screen, filled with palette colour 0 (or white if transparent).
    """
    import tensorflow as tf

    screen_width, screen_height = reader.u16(6, little=True), reader.u16(8, little=True)
    screen_flags = reader.u8(10)
    has_global = screen_flags >= 128
    global_size = 3 * 2 ** (screen_flags % 8 + 1)
    blocks = _gif_first_frame_blocks(reader, 13 + tf.where(has_global, global_size, 0))
    descriptor, transparent = blocks["descriptor"], blocks["transparent"]
    left, top = reader.u16(descriptor + 1, little=True), reader.u16(descriptor + 3, little=True)
    width, height = reader.u16(descriptor + 5, little=True), reader.u16(descriptor + 7, little=True)
    frame_flags = reader.u8(descriptor + 9)
    has_local = frame_flags >= 128
    palette = tf.where(has_local, descriptor + 10, tf.where(has_global, _i64(13), _i64(-1)))
    palette_size = tf.where(has_local, 3 * 2 ** (frame_flags % 8 + 1), tf.where(has_global, global_size, 0))

    gce = blocks["first_gce"]
    gce_flags = reader.u8(gce + 3)
    patched = _replace_bytes_if(
        (gce >= 0) & tf.equal(gce_flags % 2, 1), contents, gce + 3, _byte_string(gce_flags - gce_flags % 2), 1
    )
    whiten = (transparent >= 0) & (palette >= 0) & (3 * transparent + 3 <= palette_size)
    patched = _replace_bytes_if(whiten, patched, palette + 3 * transparent, tf.constant(b"\xff\xff\xff"), 3)
    patched = _replace_bytes_if(descriptor >= 0, patched, descriptor + 1, tf.constant(b"\x00" * 4), 4)

    canvas_width = tf.maximum(screen_width, left + width)
    canvas_height = tf.maximum(screen_height, top + height)
    checks = [
        _fail_unless(descriptor >= 0, "graph decoder: GIF without an image"),
        _check_pixel_count(canvas_width, canvas_height),
    ]
    with tf.control_dependencies(checks):
        frame = tf.io.decode_gif(patched)[0, :height, :width]
    # Pillow's canvas starts as index 0 (or the transparent index): palette colour 0, black without a palette.
    first_colour = tf.where(palette >= 0, reader.bytes_at(palette, 3), tf.zeros([3], tf.int64))
    background = tf.where(transparent >= 0, tf.constant([255, 255, 255], tf.int64), first_colour)
    return _place_on_canvas(frame, top, left, canvas_height, canvas_width, background)


def _place_on_canvas(
    frame: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, background: Tensor
) -> Tensor:
    import tensorflow as tf

    frame_height, frame_width = tf.unstack(tf.shape(frame, out_type=tf.int64)[:2])
    padding = [[top, height - top - frame_height], [left, width - left - frame_width], [0, 0]]
    placed = tf.pad(frame, padding)
    covered = tf.pad(tf.ones_like(frame[..., :1], dtype=tf.bool), padding)
    return tf.where(covered, placed, tf.cast(background, tf.uint8))


# ----------------------------------------------------------------------------------------------
# BMP


def _decode_bmp(reader: _ByteReader, contents: Tensor) -> Tensor:
    """Uncompressed 24/32-bit BMP (Pillow ignores the fourth byte) and 8-bit palette BMP."""
    import tensorflow as tf

    header_size = reader.u32(14, little=True)
    width, height = reader.u32(18, little=True), reader.u32(22, little=True)
    height = tf.where(height >= 2**31, 2**32 - height, height)  # top-down rows
    bits, compression = reader.u16(28, little=True), reader.u32(30, little=True)
    colours = reader.u32(46, little=True)
    supported = (
        tf.reduce_any(tf.equal(header_size, [40, 52, 56, 64, 108, 124]))
        & tf.equal(compression, 0)
        & (tf.equal(bits, 8) | tf.equal(bits, 24) | tf.equal(bits, 32))
    )
    message = "graph decoder: BMP must be uncompressed with 8-bit palette, 24-bit or 32-bit pixels"
    with tf.control_dependencies([_fail_unless(supported, message), _check_pixel_count(width, height)]):
        return tf.cond(
            tf.equal(bits, 8),
            lambda: _bmp_palette_pixels(reader, contents, header_size, colours),
            lambda: tf.io.decode_bmp(contents, channels=3),
        )


def _bmp_palette_pixels(reader: _ByteReader, contents: Tensor, header_size: Tensor, colours: Tensor) -> Tensor:
    """tf.io.decode_bmp returns the indices of an 8-bit BMP; look them up in its BGRX palette."""
    import tensorflow as tf

    indices = tf.cast(tf.io.decode_bmp(contents, channels=0)[..., 0], tf.int64)
    entries = tf.range(256, dtype=tf.int64)
    colours = tf.where(tf.equal(colours, 0), tf.constant(256, tf.int64), colours)
    table = tf.reverse(reader.bytes_at(14 + header_size + 4 * entries, 3), [1])  # BGR(X) entries
    table = tf.where((entries < colours)[:, None], table, 0)
    return tf.cast(tf.gather(table, indices), tf.uint8)


# ----------------------------------------------------------------------------------------------
# Pillow's BILINEAR resize


def resize_bilinear_like_pillow(image: Tensor, size: int) -> Tensor:
    """(h, w, 3) uint8 -> (size, size, 3) uint8, as Image.resize((size, size), Image.BILINEAR)."""
    import tensorflow as tf

    def swap(pixels: Tensor) -> Tensor:
        return tf.transpose(pixels, [1, 0, 2])

    vertical_first = tf.constant(False)
    if _pillow_may_resize_vertically_first():
        # Pillow 13's ImagingResample (python-pillow/Pillow#9549) runs the vertical pass first when
        # the height shrinks by more than twice as many pixels as the width; the order changes the
        # rounding.
        shrink_height = tf.shape(image)[0] - size
        vertical_first = (shrink_height > 0) & (shrink_height > 2 * (tf.shape(image)[1] - size))
    # Both passes resample along axis 0, where a gather copies whole contiguous rows: the axis
    # resized first is brought to axis 0, and the result turned back at the end.
    pixels = tf.cond(vertical_first, lambda: image, lambda: swap(image))
    pixels = _resample_rows(swap(_resample_rows(pixels, size)), size)
    return tf.cond(vertical_first, lambda: swap(pixels), lambda: pixels)


def _pillow_may_resize_vertically_first() -> bool:
    """Pillow before 13 always resized horizontally first; decode_image uses the installed Pillow."""
    import PIL

    return int(PIL.__version__.split(".")[0]) >= 13


def _bilinear_coefficients(in_size: Tensor, out_size: int) -> tuple[Tensor, Tensor]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for BILINEAR.

    Returns each output pixel's first input index (out_size,) and its fixed-point tap weights
    (out_size, ksize) as int32. Every float64 operation is Pillow's, in Pillow's order, and the
    normalising sum runs tap by tap like the C loop, so the rounded weights are identical.
    """
    import tensorflow as tf

    f64 = tf.float64
    scale = tf.cast(in_size, f64) / out_size
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale  # the bilinear filter's support is 1.0
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    inverse_filterscale = 1.0 / filterscale
    center = (tf.range(out_size, dtype=f64) + 0.5) * scale
    # C's (int) cast truncates towards zero, as tf.cast does.
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    taps_used = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - first
    taps = tf.range(ksize)
    position = tf.cast(first[:, None] + taps[None, :], f64)
    weights = tf.maximum(1.0 - tf.abs((position - center[:, None] + 0.5) * inverse_filterscale), 0.0)
    weights = tf.where(taps[None, :] < taps_used[:, None], weights, 0.0)
    total = tf.foldl(
        lambda running, column: running + column, tf.transpose(weights), initializer=tf.zeros([out_size], f64)
    )
    normalized = tf.where(tf.not_equal(total, 0.0)[:, None], weights / total[:, None], weights)
    fixed = tf.cast(0.5 + normalized * (1 << _PRECISION_BITS), tf.int32)
    return first, fixed


#: Above this many gathered samples (int32) a pass adds one tap at a time instead of all at once.
_GATHER_ALL_TAPS_LIMIT = 1 << 23


def _resample_rows(image: Tensor, out_size: int) -> Tensor:
    """One pass of Pillow's 8-bit resampling along axis 0; none when the size is unchanged, as in Pillow."""
    import tensorflow as tf

    in_size = tf.shape(image)[0]

    def resample() -> Tensor:
        first, weights = _bilinear_coefficients(in_size, out_size)
        ksize = tf.shape(weights)[1]
        # Padding taps have weight 0; clamping keeps their gather in bounds.
        taps = tf.minimum(first[:, None] + tf.range(ksize)[None, :], in_size - 1)
        half = tf.constant(1 << (_PRECISION_BITS - 1), tf.int32)

        def all_taps_at_once() -> Tensor:
            pixels = tf.cast(tf.gather(image, taps), tf.int32)  # (out, ksize, width, 3)
            return half + tf.reduce_sum(pixels * weights[:, :, None, None], axis=1)

        def one_tap_at_a_time() -> Tensor:
            def add_tap(tap: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
                pixels = tf.cast(tf.gather(image, taps[:, tap]), tf.int32)
                return tap + 1, total + pixels * weights[:, tap, None, None]

            start = tf.fill(tf.concat([[out_size], tf.shape(image)[1:]], axis=0), half)
            return tf.while_loop(lambda tap, _: tap < ksize, add_tap, (tf.constant(0), start))[1]

        gathered = out_size * ksize * tf.reduce_prod(tf.shape(image)[1:])
        # Pillow's int32 accumulator starts at one half (rounding) and cannot overflow for 8-bit input.
        total = tf.cond(gathered <= _GATHER_ALL_TAPS_LIMIT, all_taps_at_once, one_tap_at_a_time)
        return tf.cast(tf.clip_by_value(tf.bitwise.right_shift(total, _PRECISION_BITS), 0, 255), tf.uint8)

    return tf.cond(tf.equal(in_size, out_size), lambda: image, resample)
