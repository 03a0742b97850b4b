"""Progress and quiet: long commands show a bar at a terminal, TensorFlow's start-up lines never reach it,
predict --csv has a column per class, and nothing loads a backbone when nothing needs computing."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bottleneck.cli import main

from .conftest import PIXELS, make_dataset, synthetic_image
from .tty import bottleneck_argv, child_env, run_in_pty

#: What TensorFlow (and TFLite) print from C++ before any log level applies.
STARTUP_LINES = (
    "absl::InitializeLog",
    "oneDNN custom operations",
    "XNNPACK",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
)


def startup_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(marker in line for marker in STARTUP_LINES)]


@pytest.fixture
def pixels_run(pixels_extracted, tmp_path) -> tuple[Path, Path, Path]:
    """(DATA, CACHE, RUN): a logreg run on the 12 images' pixels."""
    data, cache = pixels_extracted
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--runs",
                str(tmp_path / "runs"),
                "--val-pct",
                "25",
                "--test-pct",
                "25",
            ]
        )
        == 0
    )
    (run,) = (tmp_path / "runs").iterdir()
    return data, cache, run


@pytest.mark.slow
def test_export_shows_each_stage_with_the_time_left_and_no_startup_lines(pixels_run, tmp_path):
    _, _, run = pixels_run
    env = child_env(TMPDIR=str(tmp_path))  # the native log goes to the temporary folder
    code, shown = run_in_pty(
        bottleneck_argv("export", "--run", run, "--out", tmp_path / "exported", "--tflite", "--check-images", "3"),
        env,
        timeout=300,
    )
    assert code == 0, shown
    for stage in ("building the model", "model.keras", "SavedModel", "TFLite", "parity: as given", "parity: png"):
        assert f"export: {stage}" in shown, shown
    assert "8/8 [" in shown and "<" in shown  # tqdm's [elapsed<remaining]: the time left
    assert startup_lines(shown) == [], shown
    log = next(tmp_path.glob("bottleneck-native*.log")).read_text()
    assert "oneDNN custom operations" in log and "XNNPACK" in log  # kept, not lost


def test_compare_shows_the_permutation_test_progress(pixels_extracted, tmp_path):
    data, cache = pixels_extracted
    other = tmp_path / "other"
    make_dataset(other, per_class=4, start=50)
    assert main(["features", str(other), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    argv = bottleneck_argv("compare", data, other, "--cache", cache, *PIXELS, "--permutations", "50")
    code, shown = run_in_pty(argv, child_env(), timeout=120)
    assert code == 0, shown
    assert "compare: MMD permutation test" in shown and "50/50 [" in shown and "perm/s" in shown
    code, plain = run_in_pty([*argv, "--no-progress"], child_env(), timeout=120)
    assert code == 0 and "permutation test:" not in plain and "Frechet distance" in plain


@pytest.mark.slow
def test_a_keras_backbone_is_quiet_and_not_loaded_for_a_copied_folder(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=2)
    flags = [
        "--cache",
        str(cache),
        "--backbone",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--runtime",
        "keras",
        "--no-progress",
    ]
    env = child_env(TMPDIR=str(tmp_path))
    first = subprocess.run(
        bottleneck_argv("features", data, *flags), capture_output=True, text=True, env=env, timeout=300
    )
    assert first.returncode == 0 and "computed 6" in first.stdout, first.stderr
    assert startup_lines(first.stderr) == [], first.stderr

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    probe = (
        "import sys; from bottleneck.cli import main; code = main(sys.argv[1:]); "
        "print('loaded:', sorted(m for m in ('tensorflow', 'keras', 'openvino') if m in sys.modules)); "
        "sys.exit(code)"
    )
    again = subprocess.run(
        [sys.executable, "-c", probe, "features", str(copy), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "computed 0, reused 6, failed 0" in again.stdout and "loaded: []" in again.stdout


def test_a_copied_folder_is_settled_by_content_before_the_engine_starts(pixels_extracted, tmp_path, monkeypatch):
    from bottleneck.features.engines.local import LocalEngine

    data, cache = pixels_extracted
    started = []
    original = LocalEngine.start
    monkeypatch.setattr(LocalEngine, "start", lambda self, *args: started.append(1) or original(self, *args))
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    assert main(["features", str(copy), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert started == []  # every file hashed to content the store has: no backbone

    (copy / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # read, hashed, then fails to decode
    synthetic_image((10, 10, 10), seed=4242).save(copy / "red" / "zz_new.png")
    synthetic_image((10, 10, 10), seed=4243).save(copy / "blue" / "aa_new.png")
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.features.extract import extract_features

    spec = BackboneSpec(architecture="pixels", image_size=8)
    result = extract_features(copy, cache, spec, progress=False)
    assert started == [1]
    assert (result.computed, result.failed) == (2, 1) and result.reused == 12


def test_predict_csv_has_every_column_in_every_row(pixels_run, tmp_path):
    _, _, run = pixels_run
    new = tmp_path / "new"
    new.mkdir()
    synthetic_image((200, 40, 40), seed=901).save(new / "a.png")
    (new / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    assert (
        main(["predict", "--run", str(run), str(new), str(tmp_path / "absent.png"), "--top", "7", "--csv", str(out)])
        == 0
    )
    rows = list(csv.reader(open(out, newline="")))
    header = rows[0]
    assert header == [
        "path",
        "error",
        "label_1",
        "label_2",
        "label_3",
        "probability_blue",
        "probability_green",
        "probability_red",
    ]
    assert len(rows) == 4 and all(len(row) == len(header) for row in rows)
    good = dict(zip(header, next(row for row in rows if row[0].endswith("a.png"))))
    assert good["error"] == "" and good["label_1"] == "red"
    assert abs(sum(float(good[f"probability_{c}"]) for c in ("blue", "green", "red")) - 1) < 1e-6
    assert float(good["probability_red"]) == max(float(good[f"probability_{c}"]) for c in ("blue", "green", "red"))
    failed = [dict(zip(header, row)) for row in rows[1:] if row[1]]
    assert len(failed) == 2 and all(row["label_1"] == row["probability_red"] == "" for row in failed)


def test_predict_with_no_existing_path_says_so_before_loading_anything(tmp_path):
    probe = (
        "import sys; from bottleneck.cli import main; code = main(sys.argv[1:]); "
        "print('loaded:', sorted(m for m in ('tensorflow', 'keras', 'sklearn', 'torch', 'jax')"
        " if m in sys.modules)); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "predict", "--run", str(tmp_path / "no-run"), str(tmp_path / "absent.png")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"bottleneck: error: no such file or folder: {tmp_path / 'absent.png'}"
    assert "loaded: []" in done.stdout

    done = subprocess.run(
        bottleneck_argv("predict", "--run", tmp_path, "a.png", "b.png", "c.png", "d.png"),
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "bottleneck: error: none of the 4 paths given exists: a.png, b.png, c.png and 1 more"


def test_native_output_goes_to_the_log_and_python_stderr_stays(tmp_path):
    script = (
        "import os, sys\n"
        "from bottleneck.features.noise import decoder_noise_to\n"
        "from bottleneck.quiet import native_startup_quiet\n"
        "print('before', file=sys.stderr, flush=True)\n"
        "with native_startup_quiet():\n"
        "    os.write(2, b'native start-up line\\n')\n"
        "    with native_startup_quiet():\n"
        "        os.write(2, b'nested line\\n')\n"
        "with decoder_noise_to('decoder.log'):\n"
        "    terminal = sys.stderr\n"
        "    with native_startup_quiet():\n"
        "        assert sys.stderr is sys.__stderr__  # an import meanwhile keeps a stream that outlives it\n"
        "        os.write(2, b'loaded while decoding\\n')\n"
        "    assert sys.stderr is terminal\n"
        "    os.write(2, b'decoder line\\n')\n"
        "print('after', file=sys.stderr, flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env(TMPDIR=str(tmp_path)),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "before\nafter\n"
    (log,) = tmp_path.glob("bottleneck-native*.log")
    lines = log.read_text().splitlines()
    assert lines[1:] == ["native start-up line", "nested line", "loaded while decoding"]  # after one stamp line
    assert (tmp_path / "decoder.log").read_text() == "decoder line\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "commands", [("train-head --head keras", "pretrain"), ("audit",)], ids=["train-head keras, pretrain", "audit"]
)
def test_long_training_commands_show_progress_with_eta_at_a_terminal(commands, pixels_extracted, tmp_path):
    """Every step that can take long draws a bar with the time left on a terminal, and no start-up lines.

    The two Keras trainings run one after the other in one process: one TensorFlow start-up, two bars."""
    data, cache = pixels_extracted
    argvs = {
        "train-head --head keras": [
            "train-head",
            "--data",
            data,
            "--cache",
            cache,
            *PIXELS,
            "--head",
            "keras",
            "--epochs",
            "5",
            "--patience",
            "100",
            "--runs",
            tmp_path / "runs",
        ],
        "pretrain": [
            "pretrain",
            "--data",
            data,
            "--out",
            tmp_path / "base.keras",
            "--image-size",
            "16",
            "--blocks",
            "1",
            "--filters",
            "4",
            "--epochs",
            "3",
        ],
        "audit": ["audit", "--data", data, "--cache", cache, *PIXELS, "--out", tmp_path / "audit", "--folds", "2"],
    }
    if len(commands) == 1:
        argv = bottleneck_argv(*argvs[commands[0]])
    else:
        calls = [[str(arg) for arg in argvs[command]] for command in commands]
        argv = [
            sys.executable,
            "-c",
            f"import sys; from bottleneck.cli import main; sys.exit(max([main(argv) for argv in {calls!r}]))",
        ]
    code, shown = run_in_pty(argv, child_env(TMPDIR=str(tmp_path)), timeout=240)
    assert code == 0, shown
    bars = {"train-head --head keras": "5/5 [", "pretrain": "3/3 [", "audit": "audit: cross-validation"}
    for command in commands:
        assert bars[command] in shown and "<" in shown, (command, shown)  # tqdm's [elapsed<remaining]
    assert startup_lines(shown) == [], shown
