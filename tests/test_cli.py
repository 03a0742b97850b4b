"""The command line: instant help, one-line errors with exit code 2, the JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bottleneck.cli import build_parser, main

from .conftest import TEST_SIZE, make_dataset


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_answers_without_loading_tensorflow():
    probe = (
        "import sys, contextlib, io\n"
        "from bottleneck.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['features', '--help'])\n"
        "    except SystemExit: pass\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_every_command_has_help_with_an_example():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        assert command.description and "example:" in (command.epilog or ""), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["features", "{tmp}/missing"], "bottleneck: error: data folder not found: {tmp}/missing"),
        (
            ["features", "{data}", "--image-size", "50", "--weights", "none"],
            "bottleneck: error: --image-size must be between 75 and 2048 for inception_v3; got 50",
        ),
        (
            ["features", "{data}", "--cache", "{tmp}/afile/cache", "--weights", "none"],
            "bottleneck: error: cannot write to cache folder {tmp}/afile/cache: Not a directory",
        ),
        (
            ["features", "{data}", "--weights", "{tmp}/nope.h5"],
            "bottleneck: error: weights file not found: {tmp}/nope.h5 (use --weights imagenet, none, or a path)",
        ),
    ],
    ids=["missing-data", "small-size", "unwritable-cache", "missing-weights"],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path, argv, message):
    data = tmp_path / "data"
    make_dataset(data, per_class=1)
    (tmp_path / "afile").write_text("x")
    filled = [a.format(tmp=tmp_path, data=data) for a in argv]
    code, out, err = run_cli(capsys, *filled)
    assert code == 2
    assert err.strip() == message.format(tmp=tmp_path)
    assert "Traceback" not in err and out == ""


@pytest.mark.slow
def test_json_summary_is_the_last_line_and_strict_fails_on_bad_files(capsys, tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (data / "red" / os.fsdecode(b"not utf8 \xff.png")).write_bytes(b"")
    argv = ["features", str(data), "--cache", str(cache), "--weights", "none", "--image-size", str(TEST_SIZE), "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {
        "images",
        "computed",
        "reused",
        "failed",
        "store",
        "seconds",
        "images_per_second",
        "decoder_warnings",
    }
    assert (summary["images"], summary["computed"], summary["failed"]) == (8, 6, 2)
    assert "RANDOM WEIGHTS" in err and "broken.jpg: not an image Pillow can read" in err
    assert "not utf8 \ufffd.png: empty file (0 bytes)" in err

    code, out, err = run_cli(capsys, *argv, "--strict")
    assert code == 2
    assert json.loads(out.strip().splitlines()[-1])["reused"] == 6
    assert err.strip().splitlines()[-1] == "bottleneck: error: 2 images failed and --strict is set (see the list above)"


def test_file_names_with_control_characters_stay_on_their_line_and_send_no_escape(capsys, tmp_path):
    """A newline or an ESC in a file name, printed as is, split a line or coloured the terminal."""
    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=3)
    (data / "red" / "two\nlines.png").write_bytes(b"not an image")
    (data / "blue" / "esc\x1b[31mred.png").write_bytes(b"not an image")
    pixels = ["--backbone", "pixels", "--image-size", "8"]
    code, out, err = run_cli(capsys, "features", str(data), "--cache", str(cache), *pixels, "--no-progress")
    assert code == 0 and "\x1b" not in out + err
    assert "/red/two\\nlines.png: not an image Pillow can read" in out
    assert "/blue/esc\\x1b[31mred.png: not an image Pillow can read" in out
    argv = ["train-head", "--data", str(data), "--cache", str(cache), *pixels, "--runs", str(runs), "--C", "1"]
    assert run_cli(capsys, *argv)[0] == 0
    [run] = runs.iterdir()
    code, out, err = run_cli(capsys, "predict", "--run", str(run), str(data))
    rows = [line for line in out.splitlines() if "lines.png" in line or "red.png" in line]
    assert code == 0 and len(rows) == 2 and all("error: not an image Pillow can read" in row for row in rows)
    code, out, err = run_cli(capsys, "predict", "--run", str(run), str(data / "red" / "two\nlines.png"))
    assert code == 2 and err.count("\n") == 1 and "two\\nlines.png: not an image Pillow can read" in err


def test_text_helpers():
    from bottleneck.text import first_line, one_line

    assert one_line("a\nb\tc\x1b[0m\x7f\x85 é") == "a\\nb\\tc\\x1b[0m\\x7f\\x85 é"
    assert first_line(ValueError("x" * 300), 200) == "x" * 197 + "..." and len(first_line("y" * 201, 200)) == 200
    assert first_line("short\nsecond", 200) == "short" and first_line(KeyError("key")) == "key"
    assert first_line(ValueError()) == "ValueError"
