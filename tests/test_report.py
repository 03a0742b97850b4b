"""The report: Markdown tables, one self-contained HTML page that a real browser renders."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bottleneck.backbones.spec import BackboneSpec
from bottleneck.errors import DataError
from bottleneck.features.extract import extract_features
from bottleneck.inspect.report import write_report
from bottleneck.learn.pretrain import PretrainConfig, pretrain
from bottleneck.learn.runs import HeadConfig, train_head
from bottleneck.learn.splits import SplitConfig

from .conftest import make_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "report.py"
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Injected into a copy of the page: the title reports how many images decoded with real pixels.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.title = 'IMAGES ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + imgs.length;
});</script>"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data, cache, runs = root / "data", root / "cache", root / "runs"
    # Similar colours make a hard problem, so there are misclassified test images to show.
    make_dataset(data, per_class=10, classes={"a": (120, 120, 120), "b": (125, 120, 120), "c": (120, 125, 120)})
    base = root / "untrained.keras"  # random weights, as InceptionV3's `--weights none`, at a fraction of its cost
    pretrain(data, base, PretrainConfig(image_size=16, blocks=2, filters=8, epochs=0))
    extract_features(data, cache, BackboneSpec(architecture=str(base), layer="features"))
    split = SplitConfig(val_pct=20, test_pct=30)
    train_head(data, cache, runs, head=HeadConfig("logreg", C=0.01), split=split)
    train_head(data, cache, runs, head=HeadConfig("keras", epochs=5), split=split)
    return runs


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium found: `make test` installs it (apt-get install chromium)")


def test_report_page_is_self_contained_and_renders_every_image(runs, tmp_path):
    path, markdown = write_report(runs)
    assert path == runs / "report.html"
    page = path.read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(sources) >= 4 and all(s.startswith("data:image/") for s in sources)
    assert "RANDOM WEIGHTS" in page and "learning curve" in page and "misclassified test images" in page
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [
            browser(),
            *BROWSER_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe_page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    loaded = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", dom)
    assert loaded, dom[:500]
    assert int(loaded.group(1)) == int(loaded.group(2)) == len(sources)


def test_markdown_has_the_comparison_and_per_class_tables(runs):
    _, markdown = write_report(runs, runs / "elsewhere.html")
    lines = markdown.splitlines()
    assert lines[2].startswith(
        "| run | head | settings | split seed | backbone | excluded | train acc | val acc | "
        "test acc [95% CI] | test images | test macro F1 [95% CI] | vs row above (same test images) |"
    )
    assert sum(1 for line in lines if "-logreg-" in line or "-keras-" in line) >= 4
    assert markdown.count("per-class test metrics") == 2 and (runs / "elsewhere.html").exists()


@pytest.mark.slow
def test_script_prints_markdown_and_fails_cleanly(runs, tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", str(runs)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("# Runs")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", str(tmp_path / "none")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        f"bottleneck: error: no runs in {tmp_path / 'none'}: train one with `bottleneck train-head --data DATA --runs {tmp_path / 'none'}`"
    )


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="^no runs in "):
        write_report(tmp_path)


def _cells(markdown: str, run_id: str) -> dict[str, str]:
    lines = markdown.splitlines()
    header = [c.strip() for c in lines[2].strip("|").split(" | ")]
    [row] = [line for line in lines if line.startswith(f"| {run_id} |")]
    return dict(zip(header, (c.strip() for c in row.strip("|").split(" | "))))


def test_the_comparison_shows_intervals_test_sizes_and_the_paired_difference_on_shared_images(runs):
    import csv
    import json

    import numpy as np

    from bottleneck.learn.metrics import paired_difference

    _, markdown = write_report(runs, runs / "paired.html")
    first, second = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    metrics = json.loads((second / "metrics.json").read_text())["splits"]["test"]
    cells = _cells(markdown, second.name)
    low, high = metrics["accuracy_ci"]
    assert cells["test acc [95% CI]"] == f"{metrics['accuracy']:.4f} [{low:.3f}, {high:.3f}]"
    assert cells["test images"] == str(metrics["images"]) and cells["excluded"] == "-"
    assert cells["backbone"] == "untrained.keras, layer features (RANDOM WEIGHTS)"  # in words, not the fingerprint

    def right(run) -> dict[str, bool]:
        with open(run / "test_predictions.csv", newline="") as handle:
            return {row["path"]: row["label"] == row["predicted"] for row in csv.DictReader(handle)}

    mine, theirs = right(second), right(first)
    expected = paired_difference(np.array([mine[p] for p in sorted(mine)]), np.array([theirs[p] for p in sorted(mine)]))
    lo, hi = expected["ci"]
    assert (
        cells["vs row above (same test images)"]
        == f"{expected['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] on {metrics['images']}"
    )
    assert _cells(markdown, first.name)["vs row above (same test images)"] == "-"
    assert "paired bootstrap" in markdown and "paired bootstrap" in (runs / "paired.html").read_text()


def test_an_excluded_run_is_compared_on_the_same_test_images(tmp_path):
    """The issue's case: a cleaned run beside the original; the report says how many images were left out and
    compares the two on every test image (the listed test images stay in the exam)."""
    from bottleneck.learn.splits import read_split_csv

    data, cache, runs = tmp_path / "data", tmp_path / "cache", tmp_path / "runs"
    make_dataset(data, per_class=12)
    extract_features(data, cache, BackboneSpec(architecture="pixels", image_size=8))
    split = SplitConfig(val_pct=20, test_pct=30, seed=2)
    plain = train_head(data, cache, runs, head=HeadConfig("logreg"), split=split)
    saved = read_split_csv(plain.run_dir / "split.csv")
    test = sorted(p for p, (_, s) in saved.items() if s == "test")
    train = [p for label in ("blue", "green", "red") for p in sorted(saved) if saved[p] == (label, "train")][::3][:5]
    assert len(train) == 5
    (tmp_path / "exclude.txt").write_text("\n".join(test[:3] + train) + "\n")
    cleaned = train_head(
        data, cache, runs, head=HeadConfig("logreg"), split=split, exclude=str(tmp_path / "exclude.txt")
    )
    _, markdown = write_report(runs)
    cells = _cells(markdown, cleaned.run_dir.name)
    assert cells["excluded"] == "5 (+3 listed test images kept)" and cells["test images"] == str(len(test))
    # rows go in run-folder order: two runs of one second follow their random suffixes, so ask the second row
    later = _cells(markdown, max(plain.run_dir.name, cleaned.run_dir.name))
    assert later["vs row above (same test images)"].endswith(f" on {len(test)}")
    assert cells["backbone"] == "pixels 8"


def test_backbone_words_name_each_kind_of_backbone():
    from bottleneck.inspect.report import backbone_words

    spec = {"pooling": "avg", "preprocess": None, "precision": "float32", "calibration": None}
    assert (
        backbone_words(
            {
                "backbone_spec": dict(
                    spec, architecture="/m/base.keras", weights="imagenet", image_size=64, layer="features"
                ),
                "backbone_file": {"name": "base"},
            }
        )
        == "base.keras, layer features"
    )
    assert (
        backbone_words(
            {"backbone_spec": dict(spec, architecture="inception_v3", weights="imagenet", image_size=299, layer=None)}
        )
        == "inception_v3 299 imagenet"
    )
    assert (
        backbone_words(
            {
                "backbone_spec": dict(
                    spec,
                    architecture="resnet50",
                    weights="/w/mine.weights.h5",
                    image_size=224,
                    layer=None,
                    precision="int8",
                )
            }
        )
        == "resnet50 224 mine.weights.h5 int8"
    )
    assert (
        backbone_words({"backbone_spec": dict(spec, architecture="pixels", weights="none", image_size=32, layer=None)})
        == "pixels 32"
    )
    assert backbone_words({"fingerprint": "old-run-1a2b"}) == "old-run-1a2b"  # a run from before the spec was recorded
