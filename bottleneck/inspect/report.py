"""The report over a folder of runs: one self-contained HTML page, and the same tables in Markdown.

The page embeds its pictures (confusion matrices, learning curves, calibration and ROC / PR curves
from `plots`, the embedding map and nearest training images from `run_pictures`, thumbnails of
misclassified test images) as data URIs, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Callable

from bottleneck.errors import DataError, disk_full, is_disk_full
from bottleneck.features.noise import decoder_noise_beside, describe
from bottleneck.inspect.embedding_map import STYLE as MAP_STYLE
from bottleneck.inspect.report_figures import confusion_png, learning_curve_png, thumbnail_uri
from bottleneck.inspect.report_runs import Run, _skipped, load_runs
from bottleneck.learn.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    backbone_fingerprint,
    read_run_json,
    read_test_predictions,
    run_path,
)
from bottleneck.text import shown

_THUMBNAILS_PER_RUN = 24


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _with_interval(value: float | None, interval) -> str:
    """A score and, when recorded, its 95% interval: `0.7391 [0.609, 0.870]`."""
    if value is None or not isinstance(interval, list) or len(interval) != 2:
        return _fmt(value)
    return f"{_fmt(value)} [{interval[0]:.3f}, {interval[1]:.3f}]"


def backbone_words(config: dict) -> str:
    """The backbone a run learnt from, in words (`base.keras, layer features`; `inception_v3 299 imagenet`;
    `pixels 32`), from its recorded spec; its fingerprint when the run records none."""
    record = config.get("backbone_spec")
    architecture = record.get("architecture") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not isinstance(architecture, str):
        return backbone_fingerprint(config) or "?"
    size = record.get("image_size")
    if architecture == "pixels":
        words = f"pixels {size}"
    elif record.get("layer") or architecture.endswith(".keras"):  # a model file cut at a layer
        kept = config.get("backbone_file")
        name = kept["name"] if isinstance(kept, dict) and isinstance(kept.get("name"), str) else Path(architecture).stem
        words = f"{name}.keras, layer {record.get('layer')}"
    else:
        weights = str(record.get("weights"))
        words = f"{architecture} {size} {weights if weights in ('imagenet', 'none') else Path(weights).name}"
    precision = record.get("precision")
    return words + (f" {precision}" if isinstance(precision, str) and precision != "float32" else "")


def _excluded_cell(config: dict) -> str:
    """How many images `--exclude` left out of training and validation, and the listed test images kept."""
    record = config.get("exclude")
    if not isinstance(record, dict):
        return "-"
    if "test_kept" not in record:  # before the test split was kept whole: its test images may have been removed too
        return f"{record.get('left_out')} (test split too)"
    kept = record.get("test_kept") or 0
    return f"{record.get('left_out')}" + (
        f" (+{kept} listed test image{'s' if kept != 1 else ''} kept)" if kept else ""
    )


def _data_root(run: Run) -> str:
    root = run_path(run.folder, run.config, "data")
    return str(root.resolve()) if root else str(run.config.get("labels_file") or "")


def _test_outcomes(run: Run) -> dict[str, tuple[str, bool]] | None:
    """{path: (true label, right?)} of a single-label run's test images, from its test_predictions.csv."""
    if run.multi_label:
        return None
    predictions = read_test_predictions(run.folder)
    return (
        None
        if predictions is None
        else {path: (label, label == predicted) for path, (label, predicted) in predictions.items()}
    )


def paired_comparison(run: Run, other: Run, outcomes: Callable[[Run], dict | None] = _test_outcomes) -> dict | None:
    """`run`'s test accuracy minus `other`'s on exactly the test images both scored (same DATA, path and label),
    with a 95% paired bootstrap interval; None when they share none (or either is multi-label)."""
    from bottleneck.learn.metrics import paired_difference

    if _data_root(run) != _data_root(other):
        return None
    mine, theirs = outcomes(run), outcomes(other)
    if not mine or not theirs:
        return None
    shared = sorted(p for p in mine.keys() & theirs.keys() if mine[p][0] == theirs[p][0])
    return paired_difference([mine[p][1] for p in shared], [theirs[p][1] for p in shared]) if shared else None


def _paired_cell(found: dict | None) -> str:
    if found is None:
        return "no shared test images"
    low, high = found["ci"]
    return f"{found['difference']:+.3f} [{low:+.3f}, {high:+.3f}] on {found['images']}"


#: What the comparison table's numbers are, said under it.
COMPARISON_NOTE = (
    'Brackets: 95% percentile bootstrap intervals over the test images (seeded). "vs row above": this '
    "run's test accuracy minus the run above's on exactly the test images both scored, with a 95% paired "
    'bootstrap interval; only such a difference says one run is better. "excluded": images '
    "train-head --exclude left out of training and validation (the test split never changes)."
)


def comparison_rows(runs: list[Run]) -> list[list[str]]:
    """Header and one row per run: head, settings, split seed, backbone (in words), images left out by --exclude,
    accuracies (multi-label: mAP, marked), test accuracy and macro F1 with their 95% intervals, test size, the
    paired difference with the row above on their shared test images, training time."""
    rows = [
        [
            "run",
            "head",
            "settings",
            "split seed",
            "backbone",
            "excluded",
            "train acc",
            "val acc",
            "test acc [95% CI]",
            "test images",
            "test macro F1 [95% CI]",
            "vs row above (same test images)",
            "train s",
        ]
    ]
    cache: dict[int, dict | None] = {}

    def outcomes(run: Run) -> dict | None:
        if id(run) not in cache:
            cache[id(run)] = _test_outcomes(run)
        return cache[id(run)]

    for i, run in enumerate(runs):
        test = run.metrics["splits"].get("test") or {}
        backbone = backbone_words(run.config) + ("" if run.metrics.get("pretrained", True) else " (RANDOM WEIGHTS)")
        head = run.metrics["head"] + (f" of {run.config['parent_run']}" if run.config.get("parent_run") else "")
        score = (
            (lambda split, run=run: "mAP " + _fmt(run.accuracy(split)))
            if run.multi_label
            else (lambda split, run=run: _fmt(run.accuracy(split)))
        )
        test_score = score("test") if run.multi_label else _with_interval(run.accuracy("test"), test.get("accuracy_ci"))
        versus = (
            "-"
            if i == 0 or run.multi_label or runs[i - 1].multi_label
            else _paired_cell(paired_comparison(run, runs[i - 1], outcomes))
        )
        rows.append(
            [
                run.run_id,
                head + (" (multi-label)" if run.multi_label else ""),
                run.settings(),
                str(run.metrics.get("seed")),
                backbone,
                _excluded_cell(run.config),
                score("train"),
                score("validation"),
                test_score,
                str(test.get("images", "-")),
                _with_interval(test.get("macro_f1"), test.get("macro_f1_ci")),
                versus,
                _fmt(run.metrics.get("training_seconds"), 2),
            ]
        )
    return rows


def per_class_rows(split: dict, thresholds: dict | None = None) -> list[list[str]]:
    """Header and one row per class: precision, recall, F1, support; multi-label (`thresholds`, the run's record)
    also each label's average precision and threshold."""
    rows = [["label", "precision", "recall", "F1", "support"] + (["AP", "threshold"] if thresholds else [])]
    for label, scores in split["per_class"].items():
        row = [
            label,
            _fmt(scores["precision"], 3),
            _fmt(scores["recall"], 3),
            _fmt(scores["f1"], 3),
            str(scores["support"]),
        ]
        if thresholds:
            default = " (default)" if label in thresholds.get("defaulted", []) else ""
            row += [_fmt(scores.get("average_precision"), 3), _fmt(thresholds["thresholds"].get(label), 3) + default]
        rows.append(row)
    return rows


def multi_label_summary(split: dict) -> str:
    """One line of a multi-label split's scores."""
    return (
        f"mAP {_fmt(split['mean_average_precision'])}, micro F1 {_fmt(split['micro_f1'])}, macro F1 "
        f"{_fmt(split['macro_f1'])}, exact match {_fmt(split['exact_match'])} ({split['images']} images, "
        f"{split['labels_per_image']:.2f} labels per image, {split['predicted_per_image']:.2f} predicted)"
    )


def markdown_table(rows: list[list[str]]) -> str:
    clean = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    lines = ["| " + " | ".join(clean[0]) + " |", "|" + "---|" * len(clean[0])]
    lines += ["| " + " | ".join(row) + " |" for row in clean[1:]]
    return "\n".join(lines)


def markdown_report(runs: list[Run], summary: dict | None = None) -> str:
    """The comparison table and, per run, the per-class test metrics, in Markdown."""
    parts = []
    if summary:
        parts += (
            [f"# {summary['title']}", "", markdown_table(summary["rows"]), ""]
            + [f"- {n}" for n in summary["notes"]]
            + [""]
        )
    parts += ["# Runs", "", markdown_table(comparison_rows(runs)), "", COMPARISON_NOTE]
    if any(not run.metrics.get("pretrained", True) for run in runs):
        parts += ["", "**WARNING: runs marked RANDOM WEIGHTS use features of an untrained backbone.**"]
    for run in runs:
        test = run.metrics["splits"].get("test")
        if test and run.multi_label:
            parts += [
                "",
                f"## {run.run_id}: per-label test metrics",
                "",
                f"test: {multi_label_summary(test)}; thresholds chosen on the validation split",
                "",
                markdown_table(per_class_rows(test, run.metrics["thresholds"])),
            ]
        elif test:
            parts += ["", f"## {run.run_id}: per-class test metrics", "", markdown_table(per_class_rows(test))]
    return "\n".join(parts) + "\n"


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_section(run: Run) -> str:
    parts = [
        f'<section id="{html.escape(run.run_id)}"><h2>{html.escape(run.run_id)}</h2>',
        f"<p>{html.escape(run.metrics['head'])} head, {html.escape(run.settings())}, split seed "
        f"{run.metrics.get('seed')}, backbone <code>{html.escape(str(run.config.get('fingerprint', '?')))}</code></p>",
    ]
    if not run.metrics.get("pretrained", True):
        parts.append(f'<p class="warning">{html.escape(run.metrics.get("warning") or "RANDOM WEIGHTS")}</p>')
    cv = run.metrics.get("cross_validation")
    if cv:
        parts.append(
            f"<p>{cv['folds']}-fold cross-validation accuracy {cv['mean_accuracy']:.4f} &plusmn; {cv['std_accuracy']:.4f}</p>"
        )
    domain = (run.metrics.get("domain") or {}).get("train_vs_test")
    if domain:
        parts.append(
            f"<p>train vs test in feature space: Frechet distance {domain['frechet_distance']:.3f}, "
            f"MMD&sup2; {domain['mmd2']:.4f} (permutation p = {domain['mmd_p_value']:.3f})</p>"
        )
    test = run.metrics["splits"].get("test")
    if test and run.multi_label:
        parts.append(
            f"<p>multi-label, test: {html.escape(multi_label_summary(test))}; a threshold per label, chosen on "
            "the validation split</p><div><h3>per-label test metrics</h3>"
            + _html_table(per_class_rows(test, run.metrics["thresholds"]))
            + "</div>"
        )
    elif test:
        parts.append(
            '<div class="row"><figure><img alt="confusion matrix" src="' + confusion_png(test) + '">'
            "<figcaption>test confusion matrix (rows true, columns predicted)</figcaption></figure>"
        )
        parts.append("<div><h3>per-class test metrics</h3>" + _html_table(per_class_rows(test)) + "</div></div>")
    if test and not run.multi_label:
        parts.append(_prediction_pictures(run))
    if run.metrics.get("history"):
        parts.append(
            '<figure><img alt="learning curve" src="' + learning_curve_png(run.metrics["history"]) + '">'
            "<figcaption>learning curve</figcaption></figure>"
        )
    wrong = run.metrics.get("misclassified") or []
    pictures = _feature_pictures(run)
    parts.append("<h3>embedding map</h3>" + (pictures.map_html or _unavailable("embedding map", pictures.unavailable)))
    if wrong:
        parts.append(f"<h3>misclassified test images ({len(wrong)})</h3>")
        parts.append(
            f'<p class="note">beside each, {html.escape(pictures.note)}</p>'
            if pictures.neighbours
            else _unavailable("nearest training images", pictures.unavailable)
        )
        parts.append('<div class="thumbs">')
        for row, image_file in zip(wrong[:_THUMBNAILS_PER_RUN], run.image_files):
            uri = thumbnail_uri(image_file)  # the file's own name, not the printable one
            picture = (
                f'<img alt="{html.escape(row["path"])}" src="{uri}">'
                if uri
                else '<div class="missing">file missing</div>'
            )
            figure = (
                f"<figure>{picture}<figcaption>{html.escape(row['path'])}<br>true <b>{html.escape(row['true'])}</b>,"
                f" predicted <b>{html.escape(row['predicted'])}</b> ({row['confidence']:.2f})</figcaption></figure>"
            )
            near = pictures.neighbours.get(row["path"])
            parts.append(
                f'<div class="mistake">{figure}{_neighbours_html(pictures.root, near)}</div>' if near else figure
            )
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _unavailable(what: str, why: str | None) -> str:
    why = why or "none of these images, or no training image, has cached features"
    return f'<p class="note unavailable">{html.escape(what)} unavailable: {html.escape(shown(why))}</p>'


def _prediction_pictures(run: Run) -> str:
    """ROC and precision-recall (binary tasks) and calibration, from the run's test_predictions.csv."""
    from bottleneck.inspect.plots import prediction_pictures
    from bottleneck.learn.run_folder import RunError, read_predictions_csv

    try:
        return prediction_pictures(read_predictions_csv(run.folder))
    except RunError as exc:
        return _unavailable("ROC, precision-recall and calibration", str(exc))
    except (ValueError, IndexError) as exc:  # a hand-edited file: its probabilities do not fit its classes
        return _unavailable(
            "ROC, precision-recall and calibration", f"its test_predictions.csv does not add up ({exc})"
        )


def _feature_pictures(run: Run):
    """The run's embedding map and nearest training images (`run_pictures.FeaturePictures`)."""
    from bottleneck.inspect.run_pictures import FeaturePictures, feature_pictures

    try:  # as written: names whose bytes are not UTF-8 as they are on disk
        config, metrics = (read_run_json(run.folder / name) for name in (CONFIG_FILE, METRICS_FILE))
    except DataError as exc:
        return FeaturePictures(unavailable=str(exc))
    wrong = metrics.get("misclassified") if isinstance(metrics, dict) else None
    seed = run.metrics.get("seed")
    return feature_pictures(
        run.folder,
        config,
        wrong if isinstance(wrong, list) else [],
        _THUMBNAILS_PER_RUN,
        seed if isinstance(seed, int) else 0,
    )


def _neighbours_html(root: Path, near: list[tuple[str, str, float]]) -> str:
    """The nearest training images of a misclassified one: small thumbnails with label and cosine similarity."""
    figures = []
    for relpath, label, similarity in near:
        uri = thumbnail_uri(root / relpath, 64)
        picture = (
            f'<img alt="{html.escape(shown(relpath))}" src="{uri}">'
            if uri
            else '<div class="missing">file missing</div>'
        )
        figures.append(
            f"<figure>{picture}<figcaption>{html.escape(shown(relpath))}<br><b>{html.escape(shown(label))}</b>"
            f" ({similarity:.3f})</figcaption></figure>"
        )
    return '<div class="neighbours"><div class="note">nearest training images</div>' + "".join(figures) + "</div>"


_STYLE = (
    """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f0f0f0; } td { font-variant-numeric: tabular-nums; }
.warning { background: #fee; border: 1px solid #c00; color: #900; padding: 0.5em; font-weight: bold; }
.row { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
.thumbs { display: flex; flex-wrap: wrap; gap: 0.8em; } .thumbs figure { width: 150px; margin: 0; font-size: 0.8em; }
figcaption { overflow-wrap: anywhere; } /* a long file name wraps instead of running under its neighbour */
.mistake { display: flex; gap: 0.4em; align-items: flex-start; border: 1px solid #ddd; padding: 0.3em; }
.neighbours { display: flex; flex-wrap: wrap; gap: 0.4em; width: 230px; font-size: 0.85em; }
.neighbours .note { width: 100%; color: #555; } .thumbs .neighbours figure { width: 70px; }
.unavailable { color: #666; font-style: italic; }
.missing { width: 112px; height: 112px; background: #eee; display: flex; align-items: center; justify-content: center; }
section { border-top: 2px solid #ddd; margin-top: 2em; }
"""
    + MAP_STYLE
)


def _summary_html(summary: dict | None) -> str:
    if not summary:
        return ""
    notes = "".join(
        f'<p class="{"warning" if n.startswith("WARNING") else "note"}">{html.escape(n)}</p>' for n in summary["notes"]
    )
    return f"<h2>{html.escape(summary['title'])}</h2>{_html_table(summary['rows'])}{notes}"


def html_report(runs: list[Run], summary: dict | None = None, sections: dict[int, str] | None = None) -> str:
    """The whole report as one HTML document with every picture embedded (`sections`: already rendered, by run id())."""
    warning = ""
    if any(not run.metrics.get("pretrained", True) for run in runs):
        warning = '<p class="warning">Some runs use features of an untrained backbone (RANDOM WEIGHTS): their scores say nothing about transfer.</p>'
    body = "\n".join((sections or {}).get(id(run)) or _run_section(run) for run in runs)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>bottleneck runs</title><style>{_STYLE}</style></head>'
        f"<body><h1>bottleneck runs</h1>{_summary_html(summary)}{warning}<h2>All runs</h2>{_html_table(comparison_rows(runs))}<p class='note'>{html.escape(COMPARISON_NOTE)}</p>{body}</body></html>\n"
    )


#: What reading a metrics.json of an unexpected shape raises, deep inside the tables and pictures.
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


def _renderable(runs: list[Run], log: Callable[[str], None]) -> tuple[list[Run], dict[int, str]]:
    """The runs whose tables and pictures can be drawn, with their HTML sections; the others skipped with a line."""
    kept, sections = [], {}
    for run in runs:
        try:
            comparison_rows([run])
            markdown_report([run])
            sections[id(run)] = _run_section(run)
        except _SHAPE_ERRORS as exc:
            log(
                _skipped(
                    run.folder, f"its metrics.json is not as train-head writes it ({type(exc).__name__}: {shown(exc)})"
                )
            )
            continue
        kept.append(run)
    if not kept:
        raise DataError(
            f"none of the {len(runs)} runs in {shown(runs[0].folder.parent)} can be shown (each named above): "
            "train one again with `bottleneck train-head`"
        )
    return kept, sections


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a folder of that name, or no permission: the write below says so
        pass


def write_report(
    runs_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    summary: dict | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[Path, str]:
    """Write the HTML report (default RUNS/report.html); return its path and the Markdown tables.

    `summary` ({title, rows, notes}) is an extra table shown first, as the demo's comparison.
    A run that cannot be read or drawn is left out with a warning line to `log`. The page is
    written under a temporary name and renamed; that name is removed when the write fails and,
    if a killed run left it, at the start of the next.
    """
    target = Path(out) if out else Path(runs_dir) / "report.html"
    tmp = target.with_name(f".{target.name}.tmp")
    _remove(tmp)  # left by a killed run
    if target.is_dir():
        raise DataError(
            f"--out {shown(target)} is a folder: name the HTML file to write, as --out {shown(target / 'report.html')}"
        )
    with decoder_noise_beside(target.parent) as noise:  # thumbnails decode whatever images the runs name
        runs, sections = _renderable(load_runs(runs_dir, log), log)
        page = html_report(runs, summary, sections)
    if noise.count:
        log(f"thumbnails: {describe(noise)}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        _remove(tmp)
        if is_disk_full(exc):
            raise disk_full(target.parent, len(page.encode("utf-8"))) from None
        raise DataError(f"cannot write report {shown(target)}: {exc.strerror or exc}") from None
    return target, markdown_report(runs, summary)
