"""The report's pictures: the embedding map (hover shows a thumbnail, in Chromium), ROC / precision-recall,
calibration, nearest training images, and captions that wrap."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bottleneck.cli import main
from bottleneck.inspect.embedding_map import choose_points, project_2d
from bottleneck.inspect.report import write_report
from bottleneck.inspect.run_pictures import feature_pictures
from bottleneck.learn.metrics import calibration
from bottleneck.learn.run_folder import read_predictions_csv, read_run_json

from .test_report import BROWSER_FLAGS, browser

PIXELS16 = ["--backbone", "pixels", "--image-size", "16"]


def noisy_dataset(root: Path, per_class: int = 25, classes=("cat", "dog"), seed: int = 0) -> None:
    """Close colours under strong noise: a head that misclassifies some test images."""
    rng = np.random.default_rng(seed)
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(120 + 6 * c + rng.normal(0, 80, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{i:02d}.png")


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """(runs, DATA, CACHE): one logreg run over 50 images in two classes, some of its test images misclassified."""
    root = tmp_path_factory.mktemp("pictures")
    data, cache, runs = root / "data", root / "cache", root / "runs"
    noisy_dataset(data)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS16, "--no-progress"]) == 0
    assert (
        main(
            [
                "train-head",
                "--data",
                str(data),
                "--cache",
                str(cache),
                "--runs",
                str(runs),
                "--test-pct",
                "40",
                "--val-pct",
                "10",
            ]
        )
        == 0
    )
    [run] = runs.iterdir()
    assert json.loads((run / "metrics.json").read_text())["misclassified"], "the fixture needs mistakes to show"
    return runs, data, cache


def chromium_title(page: Path, script: str, tmp_path: Path, tries: int = 3) -> str:
    """Open a copy of `page` with `script` added in headless Chromium; the title the script set.

    On a loaded machine the dump can come before the script's promise (an image decode) settles; the page's own
    title is then still there, and only that case is tried again: a title the script set is returned as it is.
    """
    text = page.read_text(encoding="utf-8")
    own_title = re.search(r"<title>(.*?)</title>", text, re.S)
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", f"<script>{script}</script></body>"), encoding="utf-8")
    for attempt in range(tries):
        dom = subprocess.run(
            [
                browser(),
                *BROWSER_FLAGS,
                f"--user-data-dir={tmp_path / f'profile-{attempt}'}",
                "--window-size=1200,900",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        found = re.search(r"<title>(.*?)</title>", dom, re.S)
        assert found, dom[:500]
        if own_title is None or found.group(1) != own_title.group(1):
            break
    return found.group(1)


# Hovering over a point with a thumbnail: the tooltip shows, and its <img> decodes real pixels.
HOVER = """window.addEventListener('load', () => {
  const point = document.querySelector('.emap [data-i]');
  point.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
  const tip = point.closest('.emap').querySelector('.emap-tip'), img = tip.querySelector('img');
  img.decode().then(() => { document.title = 'HOVER ' + (tip.hidden ? 'hidden' : 'shown') + ' ' + img.naturalWidth
    + ' ' + img.src.slice(0, 15) + ' ' + tip.textContent.split('\\n')[0]; },
    () => { document.title = 'HOVER broken'; });
});"""


def test_embedding_map_shows_a_thumbnail_on_hover_and_needs_no_network(binary_run, tmp_path):
    runs, data, _ = binary_run
    path, _ = write_report(runs)
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)|url\(\s*["']?(https?:|//)""", page, re.I)
    assert "<h3>embedding map</h3>" in page and "t-SNE of L2-normalised cached features, 50 images" in page
    assert page.count(" data-c=") == 50 and page.count(' data-i="data:image/jpeg;base64,') == 50
    assert page.count('stroke="#000" stroke-width="2" data-c=') == len(
        json.loads(next(runs.glob("2*/metrics.json")).read_text())["misclassified"]
    )  # each mistake ringed
    title = chromium_title(path, HOVER, tmp_path)
    hover = re.fullmatch(r"HOVER shown (\d+) data:image/jpeg (\S+)", title)
    assert hover and int(hover.group(1)) > 0, title
    assert (data / hover.group(2)).is_file()  # the tooltip names the image it shows


def test_binary_run_gets_roc_and_precision_recall_with_their_areas_and_calibration(binary_run):
    from sklearn.metrics import average_precision_score, roc_auc_score

    runs, _, _ = binary_run
    [run] = [folder for folder in runs.iterdir() if folder.is_dir()]
    page = write_report(runs)[0].read_text(encoding="utf-8")
    predictions = read_predictions_csv(run)
    truth = np.array([label == "dog" for label in predictions.labels])
    auc, ap = roc_auc_score(truth, predictions.proba[:, 1]), average_precision_score(truth, predictions.proba[:, 1])
    assert f"test ROC AUC {auc:.4f}, average precision {ap:.4f} (positive class dog)" in page
    assert 'alt="ROC and precision-recall curves" src="data:image/png;base64,' in page
    ece = json.loads((run / "metrics.json").read_text())["splits"]["test"]["expected_calibration_error"]
    assert ece == pytest.approx(
        calibration(predictions.proba, predictions.labels, predictions.classes)["expected_calibration_error"]
    )
    assert f"expected calibration error {ece:.4f} (15 equal-width bins" in page and 'alt="reliability diagram"' in page


def test_expected_calibration_error_by_hand():
    # confidences 0.9 (right), 0.6 (wrong), 0.8 (right), 0.7 (right), each alone in its bin: |acc - conf| averaged
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    record = calibration(proba, ["a", "b", "a", "b"], ["a", "b"])
    assert record["expected_calibration_error"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert sum(record["count"]) == 4 and record["count"][9] == 1 and record["accuracy"][9] == 0.0
    assert calibration(np.array([[1.0, 0.0]]), ["a"], ["a", "b"])["count"][-1] == 1  # confidence 1 in the last bin


def test_nearest_training_images_are_the_cosine_nearest_of_the_train_split(binary_run):
    from bottleneck.learn.dataset import load_labelled_features
    from bottleneck.learn.splits import read_split_csv

    runs, data, cache = binary_run
    [run] = [folder for folder in runs.iterdir() if folder.is_dir()]
    wrong = read_run_json(run / "metrics.json")["misclassified"]
    pictures = feature_pictures(run, read_run_json(run / "config.json"), wrong, 24)
    assert pictures.unavailable is None and set(pictures.neighbours) == {row["path"] for row in wrong}
    loaded = load_labelled_features(data, cache)
    X = loaded.features / np.linalg.norm(loaded.features, axis=1, keepdims=True)
    split = read_split_csv(run / "split.csv")
    train = [i for i, p in enumerate(loaded.relpaths) if split[p][1] == "train"]
    for row in wrong:
        similarity = X[train] @ X[loaded.relpaths.index(row["path"])]
        best = [train[j] for j in np.argsort(-similarity, kind="stable")[:3]]
        assert [(p, label) for p, label, _ in pictures.neighbours[row["path"]]] == [
            (loaded.relpaths[i], loaded.labels[i]) for i in best
        ]
        assert [s for _, _, s in pictures.neighbours[row["path"]]] == pytest.approx(
            np.sort(similarity)[::-1][:3], abs=1e-5
        )
    page = write_report(runs)[0].read_text(encoding="utf-8")
    assert page.count('<div class="neighbours">') == len(wrong)


# Each caption's text stays inside its own figure, and figures side by side do not overlap.
OVERLAP = """window.addEventListener('load', () => {
  const figures = [...document.querySelectorAll('.thumbs > figure')];
  let bad = 0;
  for (const figure of figures) {
    const caption = figure.querySelector('figcaption'), range = document.createRange();
    range.selectNodeContents(caption);
    if (range.getBoundingClientRect().right > figure.getBoundingClientRect().right + 1) bad++;
  }
  for (let i = 1; i < figures.length; i++) {
    const a = figures[i - 1].getBoundingClientRect(), b = figures[i].getBoundingClientRect();
    if (a.top === b.top && a.right > b.left) bad++;
  }
  document.title = 'CAPTIONS ' + figures.length + ' ' + bad;
});"""


def test_long_file_names_wrap_inside_their_captions(binary_run, tmp_path):
    runs, _, _ = binary_run
    [run] = [folder for folder in runs.iterdir() if folder.is_dir()]
    long_runs = tmp_path / "runs"
    copy = shutil.copytree(run, long_runs / run.name)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["misclassified"] = [
        {"path": f"dog/{letter * 200}.png", "true": "dog", "predicted": "cat", "confidence": 0.6} for letter in "xyz"
    ]  # files that are gone: their captions still have to fit
    (copy / "metrics.json").write_text(json.dumps(metrics))
    path, _ = write_report(long_runs)
    assert chromium_title(path, OVERLAP, tmp_path) == "CAPTIONS 3 0"


def test_projection_falls_back_to_pca_for_few_points_and_keeps_marked_points_when_sampling():
    xy, method = project_2d(np.random.default_rng(0).normal(size=(8, 5)))
    assert xy.shape == (8, 2) and method.startswith("PCA") and np.isfinite(xy).all()
    assert project_2d(np.ones((1, 3)))[0].shape == (1, 2)
    kinds = [""] * 5000
    kinds[17] = kinds[4321] = "misclassified"
    chosen = choose_points(kinds, 100, seed=3)
    assert len(chosen) == 100 and {17, 4321} <= set(chosen) and list(chosen) == sorted(set(chosen))
    assert list(chosen) == list(choose_points(kinds, 100, seed=3))  # seeded
