"""The audit's files: audit.html (self-contained, thumbnails side by side), audit.json and exclude.txt.

Each file is written under a temporary name and renamed, so a killed audit leaves the previous
files or the new ones, never half of one. The page shows the first `SHOWN` items of each list
(audit.json has them all) so that it stays small at 100,000 images.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from bottleneck import naming
from bottleneck.errors import DataError, disk_full, is_disk_full
from bottleneck.features.noise import decoder_noise_beside
from bottleneck.inspect.audit import AuditResult
from bottleneck.inspect.report import _STYLE, _html_table, thumbnail_uri

#: Items of each list drawn with thumbnails on the page.
SHOWN = 100

_AUDIT_STYLE = (
    _STYLE
    + """
.pair { display: flex; gap: 0.5em; align-items: flex-start; border: 1px solid #ddd; padding: 0.4em; }
.pairs { display: flex; flex-wrap: wrap; gap: 0.8em; }
.pair figure, .thumbs figure { width: 140px; margin: 0; font-size: 0.75em; word-break: break-all; }
.leak { border-color: #c00; background: #fff4f4; }
.caption { font-size: 0.8em; width: 100%; }
"""
)


def _picture(root: Path, relpath: str, caption: str) -> str:
    uri = thumbnail_uri(root / relpath)
    picture = f'<img alt="{html.escape(relpath)}" src="{uri}">' if uri else '<div class="missing">file missing</div>'
    return f"<figure>{picture}<figcaption>{html.escape(relpath)}<br>{caption}</figcaption></figure>"


def _pairs_html(root: Path, pairs: list[dict], title: str, explain: str) -> str:
    if not pairs:
        return f"<h2>{html.escape(title)}: none</h2><p>{html.escape(explain)}</p>"
    parts = [f'<h2>{html.escape(title)} ({len(pairs)})</h2><p>{html.escape(explain)}</p><div class="pairs">']
    for pair in pairs[:SHOWN]:
        leak = " leak" if pair["leakage"] else ""
        parts.append(f'<div class="pair{leak}">')
        for path, split, label in zip((pair["a"], pair["b"]), pair["splits"], pair["labels"]):
            parts.append(_picture(root, path, f"{html.escape(label)}, <b>{html.escape(split)}</b>"))
        what = "LEAKAGE: " + " / ".join(pair["splits"]) if pair["leakage"] else "same split"
        labels = "" if pair["same_label"] else "; labels differ"
        parts.append(f'<div class="caption">distance {pair["distance"]:.4f}; {html.escape(what)}{labels}</div></div>')
    parts.append("</div>")
    if len(pairs) > SHOWN:
        parts.append(f"<p>... and {len(pairs) - SHOWN} more in audit.json</p>")
    return "".join(parts)


def _items_html(root: Path, items: list[dict], title: str, explain: str, caption) -> str:
    if not items:
        return f"<h2>{html.escape(title)}: none</h2><p>{html.escape(explain)}</p>"
    parts = [f'<h2>{html.escape(title)} ({len(items)})</h2><p>{html.escape(explain)}</p><div class="thumbs">']
    parts.extend(_picture(root, item["path"], caption(item)) for item in items[:SHOWN])
    parts.append("</div>")
    if len(items) > SHOWN:
        parts.append(f"<p>... and {len(items) - SHOWN} more in audit.json</p>")
    return "".join(parts)


def _map_section(result: AuditResult, root: Path) -> str:
    """The embedding map of the audited images, flagged ones marked (see `embedding_map`)."""
    from bottleneck.inspect.embedding_map import FLAGGED, map_html

    if result.embedding is None:
        return ""
    return (
        "<section><h2>Embedding map</h2>"
        + map_html(result.embedding, root, {FLAGGED: "flagged: label issue, outlier or duplicate"})
        + "</section>"
    )


def audit_html(result: AuditResult, data_dir: str | os.PathLike) -> str:
    """The audit as one HTML document with every thumbnail embedded."""
    root = Path(data_dir)
    counts = result.counts()
    summary = [["what", "count"]] + [[name.replace("_", " "), str(value)] for name, value in counts.items()]
    balance = [["class", "images"]] + [[label, str(n)] for label, n in result.classes.items()]
    notes = "".join(
        f'<p class="{"warning" if n.startswith("RANDOM") else "note"}">{html.escape(n)}</p>' for n in result.notes
    )
    if result.label_model:  # the model behind the label issues, stated always; a warning when too weak
        notes += (
            f'<p class="{"note" if result.label_model["trusted"] else "warning"}">'
            f"{html.escape(result.model_line() or '')}</p>"  # a line whenever label_model is set
        )
    t = result.thresholds
    sections = [
        _pairs_html(
            root,
            result.leakage,
            "Leakage: the same photo in two splits",
            "Near-duplicates or byte-identical files in different splits inflate validation and test scores. "
            "exclude.txt lists the copy in train (else validation): the scored copy stays, since "
            "train-head --exclude never changes the test split.",
        ),
        _pairs_html(
            root,
            result.near_duplicates,
            "Near-duplicates",
            f"Cosine distance on standardised features under {t['duplicate_distance']:.4g} "
            f"({t['duplicate_factor']} x the median nearest-neighbour distance).",
        ),
        _pairs_html(root, result.exact_duplicates, "Exact duplicates", "Files with the same bytes at two paths."),
        _items_html(
            root,
            result.label_issues,
            "Label issues",
            f"Confident learning (cleanlab) on out-of-fold probabilities of a {t['folds']}-fold logistic "
            "regression; most suspicious first. "
            + (result.model_line() or "")
            + ("." if not result.exclude_label_issues else "; listed in exclude.txt (--exclude-label-issues)."),
            lambda i: (
                f"given <b>{html.escape(i['given'])}</b>, suggested <b>{html.escape(i['suggested'])}</b>"
                f" ({i['score']:.2f})"
            ),
        ),
        _items_html(
            root,
            result.outliers,
            "Outliers",
            f"Mean distance to the {t['neighbours']} nearest images above {t['outlier_mean_knn_distance']:.4g} "
            f"(Q3 + 1.7 IQR); farthest first. Those above {t['far_out_mean_knn_distance']:.4g} (Q3 + 3 IQR, "
            "marked far out) are in exclude.txt.",
            lambda i: (
                f"{html.escape(i['label'])}, {html.escape(i['split'])} ({i['score']:.3f})"
                + ("<br><b>far out</b>" if i["far_out"] else "")
            ),
        ),
    ]
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>bottleneck audit</title>'
        f"<style>{_AUDIT_STYLE}</style></head><body><h1>bottleneck audit</h1>"
        f"<p>{result.images} images in {len(result.classes)} classes, store <code>{html.escape(result.store)}</code></p>"
        f'{notes}<div class="row"><div>{_html_table(summary)}</div><div>{_html_table(balance)}</div></div>'
        + _map_section(result, root)
        + "".join(f"<section>{s}</section>" for s in sections)
        + "</body></html>\n"
    )


def exclude_text(result: AuditResult) -> str:
    """exclude.txt: one path per line (relative to DATA), grouped under comments; `train-head --exclude` reads it."""
    from bottleneck.learn.dataset import escape_listed_name

    lines = [
        "# bottleneck audit: suggested removals, one path per line relative to DATA (a backslash escapes a",
        "# newline \\n, a backslash \\\\, a leading \\# or an edge space \\s in a name).",
        "# Review them, delete lines you disagree with, then: bottleneck train-head ... --exclude exclude.txt",
        "# (--exclude leaves images out of training and validation only: the test split never changes)",
    ]
    if result.label_issues and not result.exclude_label_issues:
        lines.append(
            f"# label issues ({len(result.label_issues)}): not listed; see audit.html, or audit again with "
            "--exclude-label-issues"
        )
    if result.label_model:
        lines.append(f"# {result.model_line()}")
    seen: set[str] = set()
    for reason, paths in result.suggested_removals().items():
        fresh = [p for p in paths if p not in seen]
        seen.update(fresh)
        lines.append(f"# {reason} ({len(fresh)})")
        lines.extend(escape_listed_name(p) for p in fresh)
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = naming.temporary_path(path)
    try:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(path.parent, len(text.encode("utf-8", "surrogateescape"))) from None
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_audit(result: AuditResult, data_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Path]:
    """Write audit.html, audit.json and exclude.txt into `out`; return their paths (and the decoder-warnings log's
    where the thumbnails' decoders warned)."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--out {folder} is a file: name a folder for audit.html, audit.json and exclude.txt")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create --out {folder}: {exc.strerror or exc}") from None
    files = {"html": folder / "audit.html", "json": folder / "audit.json", "exclude": folder / "exclude.txt"}
    _write(files["json"], json.dumps(result.as_json(), indent=1))
    _write(files["exclude"], exclude_text(result))
    with decoder_noise_beside(folder) as noise:  # the thumbnails' decoders
        page = audit_html(result, data_dir)
    _write(files["html"], page)
    if noise.count:
        files["decoder_warnings"] = noise.path
    return files
