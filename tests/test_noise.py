"""Decoder noise goes to a log file: C-level stderr output and Pillow's warnings, terminal kept clean."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, features

from bottleneck.errors import CacheError
from bottleneck.features.decode import ImageDecodeError, decode_image
from bottleneck.features.noise import decoder_noise_to, decoding, describe
from tests.conftest import make_dataset

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose stderr is a pipe: what reaches the terminal."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, timeout=120
    )
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()  # keeps '\r' as written
    return done


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def invalid_apng() -> bytes:
    """A PNG with an acTL chunk claiming 0 frames: Pillow warns 'Invalid APNG' and decodes the PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(buffer, "PNG")
    png = buffer.getvalue()
    after_ihdr = 8 + 25
    return png[:after_ihdr] + _chunk(b"acTL", struct.pack(">II", 0, 0)) + png[after_ihdr:]


def tiff_with_bad_field_type(path: Path) -> None:
    """A deflate TIFF (decoded by libtiff) whose private tag has an undefined field type."""
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[65000] = "hello"
    tags.tagtype[65000] = 2  # ASCII
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path, compression="tiff_deflate", tiffinfo=tags)
    data = bytearray(path.read_bytes())
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 65000:
            struct.pack_into("<H", data, at + 2, 99)  # no such TIFF type
    path.write_bytes(bytes(data))


def tiff_with_too_many_samples() -> bytes:
    """A TIFF claiming 65,535 samples per pixel: Pillow logs an error (not a warning) and refuses it."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 277:  # SamplesPerPixel
            struct.pack_into("<H", data, at + 8, 65535)
    return bytes(data)


def test_c_level_writes_go_to_the_log_while_sys_stderr_reaches_the_terminal(tmp_path):
    done = run_python(
        """
        import os, sys, threading
        from bottleneck.features.noise import decoder_noise_to, describe
        with decoder_noise_to("noise.log") as noise:
            os.write(2, b"c-level from the main thread\\n")
            worker = threading.Thread(target=os.write, args=(2, b"c-level from a thread\\n"))
            worker.start(); worker.join()
            sys.stderr.write("progress shows\\r")
            print("message shows", file=sys.stderr)
            print("live", noise.count, file=sys.stderr)
        print(describe(noise), file=sys.stderr)
        os.write(2, b"fd 2 is back\\n")
    """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stderr == "progress shows\rmessage shows\nlive 2\n2 decoder warnings (logged to noise.log)\nfd 2 is back\n"
    )
    assert (tmp_path / "noise.log").read_text() == "c-level from the main thread\nc-level from a thread\n"


@pytest.mark.skipif(not features.check("libtiff"), reason="Pillow built without libtiff")
def test_a_real_libtiff_warning_goes_to_the_log(tmp_path):
    tiff_with_bad_field_type(tmp_path / "bad.tif")
    decode = (
        "from bottleneck.features.decode import decode_image\nimport pathlib\n"
        "decode_image(pathlib.Path('bad.tif').read_bytes(), 16)\n"
    )
    bare = run_python(decode, tmp_path)
    assert bare.returncode == 0, bare.stderr
    if not bare.stderr.strip():
        pytest.skip("this libtiff does not warn about an undefined field type")
    assert "TIFF" in bare.stderr  # without the context, libtiff writes to the terminal
    done = run_python(
        "import sys\nfrom bottleneck.features.noise import decoder_noise_to\n"
        "with decoder_noise_to('noise.log') as noise:\n"
        + textwrap.indent(decode, "    ")
        + "print('lines', noise.c_lines, file=sys.stderr)\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "noise.log").read_text()
    assert log == bare.stderr
    assert done.stderr == f"lines {len(log.splitlines())}\n"


def test_pillow_warnings_from_worker_threads_are_logged_counted_and_never_deduplicated(tmp_path):
    data = invalid_apng()
    log_path = tmp_path / "noise.log"

    def decode(name: str) -> np.ndarray:
        with decoding(name):
            return decode_image(data, 8)

    with decoder_noise_to(log_path) as noise:
        with ThreadPoolExecutor(3) as pool:
            pixels = list(pool.map(decode, [f"img{i}.png" for i in range(6)]))
        decode_image(data, 8)  # same warning from the same line again, no file named
        assert noise.count == 7
    lines = log_path.read_text().splitlines()
    assert len(lines) == 7 and noise.python_warnings == 7 and noise.c_lines == 0
    assert all("UserWarning: Invalid APNG" in line for line in lines)
    assert sorted(line.split(" while decoding ")[1].split(":")[0] for line in lines[:6]) == [
        f"img{i}.png" for i in range(6)
    ]
    assert " while decoding " not in lines[6]
    assert all(tuple(p[0, 0]) == (200, 0, 0) for p in pixels)
    assert describe(noise) == f"7 decoder warnings (logged to {log_path})"


def test_what_pillow_logs_goes_to_the_log_and_its_logger_is_set_back(tmp_path):
    log_path, logger = tmp_path / "noise.log", logging.getLogger("PIL")
    before = (logger.handlers[:], logger.propagate)
    with decoder_noise_to(log_path) as noise:
        with decoding("many.tif"), pytest.raises(ImageDecodeError):
            decode_image(tiff_with_too_many_samples(), 8)
        logging.getLogger("PIL.Image").debug("below WARNING: not noise")
        assert noise.count == 1 and noise.python_warnings == 1
    assert (logger.handlers, logger.propagate) == before
    [line] = log_path.read_text().splitlines()
    assert line.endswith(
        " error while decoding many.tif: More samples per pixel than can be decoded: 65535 (PIL.TiffImagePlugin)"
    )


def test_other_warnings_pass_through_and_filters_are_restored(tmp_path):
    filters, show = list(warnings.filters), warnings.showwarning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with decoder_noise_to(tmp_path / "noise.log") as noise:
            warnings.warn("not a decoder's", RuntimeWarning)
    assert [str(w.message) for w in seen] == ["not a decoder's"]
    assert noise.count == 0 and not (tmp_path / "noise.log").exists()  # an empty new log is removed
    assert warnings.filters == filters and warnings.showwarning is show


def test_pillow_warnings_outside_the_context_are_shown_once_and_never_raised(tmp_path):
    (tmp_path / "bad.png").write_bytes(invalid_apng())
    done = run_python(
        """
        import pathlib
        from bottleneck.features.decode import ImageDecodeError, decode_image
        for _ in range(3):
            decode_image(pathlib.Path("bad.png").read_bytes(), 8)
        print("decoded")
    """,
        tmp_path,
        "-W",
        "error",
    )
    assert done.returncode == 0 and done.stdout == "decoded\n", done.stderr
    assert done.stderr.count("Invalid APNG") == 2  # one warning: its message and source line


def test_everything_is_restored_after_an_exception_or_interrupt(tmp_path):
    done = run_python(
        """
        import os, sys
        from bottleneck.features.noise import decoder_noise_to
        original = sys.stderr
        for error in (ValueError, KeyboardInterrupt):
            try:
                with decoder_noise_to("noise.log"):
                    os.write(2, b"logged\\n")
                    raise error
            except error:
                pass
            assert sys.stderr is original
            os.write(2, b"fd 2 restored after " + error.__name__.encode() + b"\\n")
        print("sys.stderr restored", file=sys.stderr)
    """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "fd 2 restored after ValueError\nfd 2 restored after KeyboardInterrupt\nsys.stderr restored\n"
    assert (tmp_path / "noise.log").read_text() == "logged\nlogged\n"


def test_exception_inside_restores_fd2_in_process(tmp_path):
    before = os.fstat(2)
    with pytest.raises(RuntimeError):
        with decoder_noise_to(tmp_path / "noise.log"):
            raise RuntimeError("boom")
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_nested_use_is_harmless(tmp_path):
    done = run_python(
        """
        import os, sys
        from bottleneck.features.noise import decoder_noise_to
        with decoder_noise_to("outer.log") as outer:
            with decoder_noise_to("outer.log") as same:
                assert same is outer
                os.write(2, b"one\\n")
            with decoder_noise_to("inner.log") as inner:
                os.write(2, b"two\\n")
                print("still visible", file=sys.stderr)
            os.write(2, b"three\\n")
        print(outer.count, inner.count, file=sys.stderr)
    """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "still visible\n2 1\n"
    assert (tmp_path / "outer.log").read_text() == "one\nthree\n"
    assert (tmp_path / "inner.log").read_text() == "two\n"


def test_the_log_is_appended_and_only_new_lines_count(tmp_path):
    log_path = tmp_path / "noise.log"
    log_path.write_text("from an earlier run\n")
    with decoder_noise_to(log_path) as noise:
        os.write(2, b"partial line without newline")
    assert noise.count == 1 and describe(noise) == f"1 decoder warning (logged to {log_path})"
    assert log_path.read_text() == "from an earlier run\npartial line without newline"


def test_decoding_names_the_file_only_in_its_own_thread(tmp_path):
    data = invalid_apng()
    with decoder_noise_to(tmp_path / "noise.log"):
        with decoding("main.png"):
            worker = threading.Thread(target=decode_image, args=(data, 8))
            worker.start()
            worker.join()
            decode_image(data, 8)
    first, second = (tmp_path / "noise.log").read_text().splitlines()
    assert " while decoding " not in first and " while decoding main.png: " in second


def test_an_unwritable_log_is_a_one_line_cache_error(tmp_path):
    before = os.fstat(2)
    with pytest.raises(CacheError, match="^cannot write decoder warnings log .*missing/noise.log: "):
        with decoder_noise_to(tmp_path / "missing" / "noise.log"):
            pass
    assert os.fstat(2).st_ino == before.st_ino


def test_a_features_run_logs_and_counts_decoder_noise_and_keeps_the_terminal_clean(tmp_path):
    """The whole `bottleneck features` command: libtiff and Pillow warnings land in the cache's log."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        Image.new("RGB", (20, 20), (0, 90, 200)).save(data / label / "plain.png")
    (data / "a" / "apng.png").write_bytes(invalid_apng())
    tiff_with_bad_field_type(data / "b" / "odd.tif")
    (data / "b" / "many.tif").write_bytes(tiff_with_too_many_samples())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bottleneck",
            "features",
            str(data),
            "--cache",
            str(cache),
            "--backbone",
            "pixels",
            "--json",
            "--augment",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["computed"] == 3 and summary["decoder_warnings"] >= 2
    # the augmented views decode the same files again: their warnings go to the log too, not to the terminal
    assert "augmented views (2 per image): computed 6" in done.stdout + done.stderr
    assert "Invalid APNG" not in done.stderr and "TIFF" not in done.stderr and "samples per pixel" not in done.stderr
    assert f"decoder warnings (logged to {cache / 'decoder-warnings.log'})" in done.stderr
    log = (cache / "decoder-warnings.log").read_text()
    assert "Invalid APNG" in log and "apng.png" in log
    assert "error while decoding " in log and "many.tif: More samples per pixel than can be decoded: 65535" in log


def test_report_and_audit_thumbnails_log_their_decoders_noise_and_keep_the_terminal_clean(tmp_path):
    """The pages' thumbnails decode every image a run names: their warnings go to a log beside the page."""
    data, cache, runs, audit = (tmp_path / name for name in ("data", "cache", "runs", "audit"))
    make_dataset(data, per_class=6)
    for label in ("red", "green", "blue"):
        (data / label / "apng.png").write_bytes(invalid_apng())
    pixels = ["--backbone", "pixels", "--image-size", "8"]
    done = run_python(
        f"""
        from bottleneck.cli import main
        assert main(["features", {str(data)!r}, "--cache", {str(cache)!r}, *{pixels!r}, "--no-progress"]) == 0
        assert main(["train-head", "--data", {str(data)!r}, "--cache", {str(cache)!r}, "--runs", {str(runs)!r},
                     "--C", "1", "--val-pct", "30", "--test-pct", "30"]) == 0
        assert main(["report", "--runs", {str(runs)!r}]) == 0
        assert main(["audit", "--data", {str(data)!r}, "--cache", {str(cache)!r}, *{pixels!r},
                     "--out", {str(audit)!r}, "--folds", "2"]) == 0
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "APNG" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert "thumbnails: " in done.stderr and f"(logged to {runs / 'decoder-warnings.log'})" in done.stderr
    assert f"thumbnails: decoder warnings logged to {audit / 'decoder-warnings.log'}" in done.stdout
    for log in (runs / "decoder-warnings.log", audit / "decoder-warnings.log"):
        assert "UserWarning: Invalid APNG" in log.read_text() and "apng.png" in log.read_text()
