"""`bottleneck audit`: planted near-duplicates, leakage, moved files and outliers are found from the cache.

The data are scikit-learn's digits 0-4 as PNG files with the `pixels` backbone (fast, and pixels of
handwritten digits separate well), with planted problems: six 3s moved into the 4s folder, three
near-copies (brightened 4%) of which two sit in another split than their original (a split file
says so), a byte copy of a 1 filed under 2 (an exact duplicate with two labels), and four noise
images. The digits themselves have a few genuinely ambiguous images, so precision is measured
rather than assumed.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from bottleneck.cli import main
from bottleneck.demo import write_digits
from tests.conftest import make_dataset
from tests.test_report import BROWSER_FLAGS, PROBE, browser

PIXELS = ["--backbone", "pixels", "--image-size", "16"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("audit")
    data, cache = root / "data", root / "cache"
    write_digits(data, [0, 1, 2, 3, 4], 32)
    moved = []
    for name in sorted(p.name for p in (data / "3").iterdir())[:6]:
        shutil.move(data / "3" / name, data / "4" / f"moved_{name}")
        moved.append(f"4/moved_{name}")
    near = []  # the usual near-copies: re-encoded as JPEG, slightly brightened, scaled down
    for digit, make_copy in (
        (0, lambda im, to: im.save(to.with_suffix(".jpg"), "JPEG", quality=90)),
        (1, lambda im, to: ImageEnhance.Brightness(im).enhance(1.02).save(to)),
        (2, lambda im, to: im.resize((28, 28), Image.BICUBIC).save(to)),
    ):
        original = sorted((data / str(digit)).iterdir())[5]
        copy = original.with_name("near_" + original.name)
        make_copy(Image.open(original).convert("RGB"), copy)
        copy = copy.with_suffix(".jpg") if digit == 0 else copy
        near.append((f"{digit}/{original.name}", f"{digit}/{copy.name}"))
    exact_source = sorted((data / "1").iterdir())[9]
    shutil.copy(exact_source, data / "2" / "copied_one.png")
    rng = np.random.default_rng(0)
    noise = []
    for digit in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / str(digit) / "noise.png")
        noise.append(f"{digit}/noise.png")
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    # A split file: every image in train, except two near-copies in test and one original in validation.
    images = sorted(str(p.relative_to(data)) for p in data.rglob("*.*"))
    splits = {path: "train" for path in images}
    splits[near[0][1]], splits[near[1][1]] = "test", "test"
    splits["2/copied_one.png"] = "validation"
    split_file = root / "split.csv"
    split_file.write_text("path,label,split\n" + "".join(f"{p},{p.split('/')[0]},{s}\n" for p, s in splits.items()))
    out = root / "audit"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the JSON line, for test_json_line_and_counts
        code = main(
            [
                "audit",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--split-file",
                str(split_file),
                "--out",
                str(out),
                "--json",
            ]
        )
    assert code == 0
    return {
        "root": root,
        "data": data,
        "cache": cache,
        "out": out,
        "moved": moved,
        "near": near,
        "noise": noise,
        "exact": (f"1/{exact_source.name}", "2/copied_one.png"),
        "result": json.loads((out / "audit.json").read_text()),
        "stdout": printed.getvalue(),
    }


def test_moved_files_are_label_issues_ranked_first(planted):
    issues = planted["result"]["label_issues"]
    flagged = [issue["path"] for issue in issues]
    planted_problems = set(planted["moved"]) | set(planted["noise"]) | {planted["exact"][1]}
    # Confident learning flags what it estimates the noise rate to be: 4 of the 6 moved 3s here (the other two
    # get P(3) = 0.89, under class 3's confidence threshold), the byte copy filed under another class, and
    # noise images, with few false alarms among 900 digits.
    assert len(set(planted["moved"]) & set(flagged)) >= 4
    assert len(planted_problems & set(flagged)) / len(flagged) >= 0.7
    for issue in issues:
        if issue["path"] in planted["moved"]:
            assert issue["given"] == "4" and issue["suggested"] == "3" and 0.5 < issue["score"] <= 1
    scores = [issue["score"] for issue in issues]
    assert scores == sorted(scores, reverse=True)


def test_near_duplicates_and_the_leakage_they_cause(planted):
    pairs = {(p["a"], p["b"]): p for p in planted["result"]["near_duplicates"]}
    found = {tuple(sorted(pair)) for pair in pairs}
    assert {tuple(sorted(pair)) for pair in planted["near"]} <= found  # recall 3/3
    leaked = {tuple(sorted((p["a"], p["b"]))) for p in planted["result"]["near_duplicates"] if p["leakage"]}
    assert tuple(sorted(planted["near"][0])) in leaked and tuple(sorted(planted["near"][1])) in leaked
    assert tuple(sorted(planted["near"][2])) not in leaked  # both in train: a duplicate, not a leak
    for pair in pairs.values():
        assert pair["distance"] < planted["result"]["thresholds"]["duplicate_distance"]


def test_exact_duplicates_are_listed_with_their_two_labels(planted):
    (pair,) = planted["result"]["exact_duplicates"]
    assert {pair["a"], pair["b"]} == set(planted["exact"])
    assert pair["leakage"] and not pair["same_label"] and pair["distance"] == 0


def test_noise_images_are_the_top_outliers(planted):
    outliers = planted["result"]["outliers"]
    assert {o["path"] for o in outliers[:4]} == set(planted["noise"])
    assert len(outliers) < 0.05 * planted["result"]["images"]  # the far tail of the digits is listed too, ranked after
    far_out = [o["path"] for o in outliers if o["far_out"]]
    assert set(planted["noise"]) <= set(far_out) and len(far_out) <= 8  # only the far-out ones go to exclude.txt


@pytest.mark.slow
def test_exclude_file_lists_the_training_copies_of_leaks_and_train_head_uses_it(planted, capsys):
    text = (planted["out"] / "exclude.txt").read_text()
    listed = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert planted["near"][0][0] in listed and planted["near"][1][0] in listed  # the training originals of test copies
    assert planted["near"][0][1] not in listed and planted["near"][1][1] not in listed  # the scored copies stay
    assert planted["exact"][0] in listed and planted["exact"][1] not in listed  # the train copy of a train/val leak
    flagged = {issue["path"] for issue in planted["result"]["label_issues"]}
    assert not (flagged - set(planted["noise"])) & set(listed)  # label issues only with --exclude-label-issues
    assert f"# label issues ({len(flagged)}): not listed" in text and set(planted["noise"]) <= set(listed)
    runs = planted["root"] / "runs"
    assert (
        main(
            [
                "train-head",
                "--data",
                str(planted["data"]),
                "--cache",
                str(planted["cache"]),
                *PIXELS,
                "--runs",
                str(runs),
                "--exclude",
                str(planted["out"] / "exclude.txt"),
                "--split-file",
                str(planted["root"] / "split.csv"),
                "--C",
                "1",  # a fixed C: choosing it by cross-validation (tests/test_tuned_heads.py) would be most of this time
            ]
        )
        == 0
    )  # the split the audit checked
    printed = capsys.readouterr().out
    assert f"{len(set(listed))} images left out of training and validation: listed in" in printed
    assert re.search(r"  test       accuracy \d\.\d{4} \[\d\.\d{3}, \d\.\d{3}\]  macro F1", printed)  # with its 95% CI
    (run,) = runs.iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["exclude"]["left_out"] == len(set(listed)) and config["exclude"]["test_kept"] == 0
    in_split = (run / "split.csv").read_text()
    assert not any(f"\n{path}," in in_split for path in listed)


def test_the_audit_states_the_cross_validated_accuracy_behind_its_label_issues(planted):
    model = planted["result"]["label_model"]
    assert model["metric"] == "accuracy" and model["folds"] == 5 and model["trusted"]
    assert 0.85 <= model["value"] <= 1 and model["chance"] == pytest.approx(
        max(planted["result"]["classes"].values()) / planted["result"]["images"], abs=1e-6
    )
    page = (planted["out"] / "audit.html").read_text()
    assert f"cross-validated logistic regression with accuracy {model['value']:.3f}" in page and "TOO WEAK" not in page
    assert f"accuracy {model['value']:.3f} (chance" in (planted["out"] / "exclude.txt").read_text()


def test_fits_that_stop_before_converging_are_counted_in_one_line_not_warned(tmp_path, capsys, monkeypatch):
    """scikit-learn's ConvergenceWarning is nine lines per fit on the terminal; the audit counts them instead."""
    from sklearn.exceptions import ConvergenceWarning

    import bottleneck.inspect.audit as audit

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=10)
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    monkeypatch.setattr(audit, "MAX_ITER", 2)  # stops every fit early
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        argv = ["audit", "--data", str(data), "--cache", str(cache), *PIXELS, "--out", str(tmp_path / "a"), "--json"]
        assert main(argv) == 0
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    captured = capsys.readouterr()
    model = json.loads(captured.out.strip().splitlines()[-1])["label_model"]
    assert (model["fits"], model["not_converged"], model["max_iter"]) == (5, 5, 2)
    assert "; 5 of its 5 fits stopped at 2 iterations before converging" in captured.err
    assert "ConvergenceWarning" not in captured.err


def test_a_weak_model_says_its_label_issues_cannot_be_trusted(tmp_path, capsys):
    """Three classes of nearly one colour: the cross-validated model is near chance, so the audit says its flags are
    not to be trusted and keeps them out of exclude.txt."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=15, classes={"a": (120, 120, 120), "b": (122, 120, 120), "c": (120, 122, 120)})
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        main(["audit", "--data", str(data), "--cache", str(cache), *PIXELS, "--out", str(tmp_path / "audit"), "--json"])
        == 0
    )
    captured = capsys.readouterr()
    record = json.loads(captured.out.strip().splitlines()[-1])
    model = record["label_model"]
    assert model["value"] < 0.85 and not model["trusted"] and model["chance"] == pytest.approx(1 / 3)
    assert (
        f"WARNING: label issues come from a 5-fold cross-validated logistic regression with accuracy "
        f"{model['value']:.3f} (chance 0.333): TOO WEAK" in captured.err
    )
    assert "TOO WEAK" in (tmp_path / "audit" / "audit.html").read_text()
    listed = [
        line for line in (tmp_path / "audit" / "exclude.txt").read_text().splitlines() if not line.startswith("#")
    ]
    assert not {issue["path"] for issue in record["label_issues"]} & set(listed)


@pytest.mark.slow
def test_label_issues_go_to_exclude_txt_when_asked_and_progress_bars_show_the_long_steps(tmp_path, capsys):
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.inspect.audit import AuditConfig, run_audit

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=15, classes={"a": (120, 120, 120), "b": (122, 120, 120), "c": (120, 122, 120)})
    assert main(["features", str(data), "--cache", str(cache), *PIXELS, "--no-progress"]) == 0
    assert (
        main(
            [
                "audit",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *PIXELS,
                "--out",
                str(tmp_path / "audit"),
                "--exclude-label-issues",
            ]
        )
        == 0
    )
    assert "audit:" not in capsys.readouterr().err  # no bar when stderr is no terminal
    flagged = json.loads((tmp_path / "audit" / "audit.json").read_text())["label_issues"]
    listed = (tmp_path / "audit" / "exclude.txt").read_text().splitlines()
    assert flagged and {issue["path"] for issue in flagged} <= set(listed)
    run_audit(data, cache, BackboneSpec(architecture="pixels", image_size=16), AuditConfig(folds=3), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"audit: kNN graph: 100%.*45/45 \[", err) and re.search(r"audit: cross-validation: 100%.*3/3", err)


def test_json_line_and_counts(planted):
    result = planted["result"]
    assert result["counts"]["label_issues"] == len(result["label_issues"])
    assert result["counts"]["leakage"] == sum(
        p["leakage"] for p in result["near_duplicates"] + result["exact_duplicates"]
    )
    last = json.loads(planted["stdout"].strip().splitlines()[-1])  # what `audit --json` printed last
    assert {"near_duplicates", "label_issues", "outliers", "counts"} <= set(last)
    assert set(last["near_duplicates"][0]) >= {"a", "b", "distance", "splits"}
    assert set(last["label_issues"][0]) >= {"path", "given", "suggested", "score"}
    assert set(last["outliers"][0]) >= {"path", "label", "score"}


def test_audit_page_is_self_contained_and_every_thumbnail_renders(planted, tmp_path):
    page = (planted["out"] / "audit.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(sources) >= 30 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "Leakage" in page and "Label issues" in page and "Outliers" in page
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
    assert loaded and int(loaded.group(1)) == int(loaded.group(2)) == len(sources)


@pytest.mark.slow
def test_random_weights_refuse_to_call_pairs_duplicates(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=4)
    shutil.copy(next((data / "red").iterdir()), data / "blue" / "copy.png")
    # any network with random weights: the smallest Keras application builds in a fraction of InceptionV3's time
    network = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32"]
    assert main(["features", str(data), "--cache", str(cache), *network, "--no-progress"]) == 0
    assert (
        main(
            [
                "audit",
                "--data",
                str(data),
                "--cache",
                str(cache),
                *network,
                "--out",
                str(tmp_path / "a"),
                "--folds",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "WARNING: RANDOM WEIGHTS" in out and "near-duplicates are not reported" in out
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert result["near_duplicates"] == [] and len(result["exact_duplicates"]) == 1 and not result["pretrained"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"only": 3}, "found 1 class folder with images"),
        ({"a": 3, "b": 1}, "class 'b' has a single image with features"),
    ],
)
def test_data_an_audit_cannot_use_is_one_line(tmp_path, capsys, layout, message):
    data = tmp_path / "data"
    for label, count in layout.items():
        make_dataset(data, per_class=count, classes={label: (120, 80, 40)})
    assert main(["features", str(data), "--cache", str(tmp_path / "c"), *PIXELS, "--no-progress"]) in (0, 2)
    capsys.readouterr()
    assert (
        main(["audit", "--data", str(data), "--cache", str(tmp_path / "c"), *PIXELS, "--out", str(tmp_path / "a")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_an_exclude_file_naming_missing_images_is_one_line(planted, tmp_path, capsys):
    listing = tmp_path / "exclude.txt"
    listing.write_text("# a comment\n0/no_such_image.png\n")
    assert (
        main(
            [
                "train-head",
                "--data",
                str(planted["data"]),
                "--cache",
                str(planted["cache"]),
                *PIXELS,
                "--runs",
                str(tmp_path / "runs"),
                "--exclude",
                str(listing),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "names 1 images that are not under DATA, first 0/no_such_image.png" in err


def test_audit_page_maps_the_images_flagged_ones_marked_and_hover_shows_a_thumbnail(planted, tmp_path):
    from tests.test_report_pictures import HOVER, chromium_title

    result = planted["result"]
    page = (planted["out"] / "audit.html").read_text()
    flagged = (
        {issue["path"] for issue in result["label_issues"]}
        | {o["path"] for o in result["outliers"]}
        | {path for pair in result["near_duplicates"] + result["exact_duplicates"] for path in (pair["a"], pair["b"])}
    )
    assert set(re.findall(r'<rect [^>]*stroke="#d00"[^>]* data-c="([^"\n]*)', page)) == flagged
    assert page.count(" data-c=") == result["images"] and "embedding" not in result  # the map is the page's alone
    assert re.search(
        r"(t-SNE|UMAP) of the audit&#x27;s standardised features, L2-normalised \(its cosine distance\), "
        f"{result['images']} images",
        page,
    )
    title = chromium_title(planted["out"] / "audit.html", HOVER, tmp_path)
    hover = re.fullmatch(r"HOVER shown (\d+) data:image/jpeg (\S+)", title)
    assert hover and int(hover.group(1)) > 0 and (planted["data"] / hover.group(2)).is_file(), title
