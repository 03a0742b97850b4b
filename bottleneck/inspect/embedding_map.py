"""The embedding map: cached features projected to 2-D, drawn as inline SVG whose points show their image on hover.

Projection: UMAP when the `umap` package happens to be installed, else scikit-learn's t-SNE
(seeded, on the first 50 principal components), with PCA for fewer than `MIN_TSNE` points or when
t-SNE fails. Features are L2-normalised first (the cosine geometry the nearest neighbours use).
At most `MAX_POINTS` points are projected (the marked ones first, then a seeded sample of the rest)
and at most `MAX_THUMBNAILS` of them carry a thumbnail; the page says so when it leaves any out.
The map needs no network: its pictures are data URIs and its script is a few inline lines.
"""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Points projected per map: t-SNE's cost grows with them (about 3 s for 900 on one thread).
MAX_POINTS = 1000
#: t-SNE's iterations (scikit-learn's default is 1,000; the layout is settled well before).
TSNE_ITERATIONS = 500
#: Points that show a thumbnail on hover (each about 2 KB of the page).
MAX_THUMBNAILS = 500
#: Below this many points, t-SNE has no neighbourhoods to keep: PCA.
MIN_TSNE = 30
#: Side of a hover thumbnail, in pixels.
THUMBNAIL_SIDE = 64
_WIDTH, _HEIGHT, _MARGIN = 640, 480, 12
#: Distinct colours for labels (Tableau 10), then hues spread by the golden angle.
_PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
_map_ids = itertools.count(1)


@dataclass
class Embedding:
    """Points of a map: their 2-D place, file, label, hover text and mark ('' or a key of the map's `marks`)."""

    xy: np.ndarray  # (m, 2)
    relpaths: list[str]
    labels: list[str]
    captions: list[str]
    kinds: list[str]
    method: str
    total: int  # points there were before `MAX_POINTS` was applied
    of: str = "L2-normalised cached features"  # what was projected, for the page


def choose_points(kinds: list[str], limit: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Positions of at most `limit` points: the marked ones first, then a seeded sample of the others; sorted."""
    marked = np.array([i for i, kind in enumerate(kinds) if kind], np.int64)
    plain = np.array([i for i, kind in enumerate(kinds) if not kind], np.int64)
    if len(kinds) <= limit:
        return np.arange(len(kinds))
    rng = np.random.default_rng(seed)
    marked = marked[np.sort(rng.permutation(len(marked))[:limit])] if len(marked) > limit else marked
    rest = plain[np.sort(rng.permutation(len(plain))[: limit - len(marked)])]
    return np.sort(np.concatenate([marked, rest]))


def _pca_2d(X: np.ndarray) -> np.ndarray:
    centred = X - X.mean(axis=0)
    if len(X) < 2:
        return np.zeros((len(X), 2))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))  # one feature or one image: a line


def project_2d(X: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, 2) coordinates of the rows of `X` and the method that placed them ('UMAP', 't-SNE' or 'PCA ...')."""
    X = np.asarray(X, np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    if len(X) < MIN_TSNE:
        return _pca_2d(X), f"PCA (t-SNE needs {MIN_TSNE} points or more)"
    try:
        import umap  # optional: used when it happens to be installed, never required
    except ImportError:
        umap = None
    if umap is not None:
        try:
            return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(X) - 1)).fit_transform(
                X
            ), "UMAP"
        except Exception:  # noqa: BLE001 - any failure of an optional library falls back to t-SNE
            pass
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        reduced = (
            PCA(n_components=min(50, *X.shape), svd_solver="randomized", random_state=seed).fit_transform(X)
            if X.shape[1] > 50
            else X
        )
        from threadpoolctl import threadpool_limits

        tsne = TSNE(
            n_components=2,
            perplexity=min(30.0, (len(X) - 1) / 3),
            init="pca",
            learning_rate="auto",
            max_iter=TSNE_ITERATIONS,
            random_state=seed,
        )
        # One OpenMP thread: on a busy machine t-SNE's spinning threads took 10x longer (3 s vs 30 s, 900 points).
        with threadpool_limits(limits=1, user_api="openmp"):
            return tsne.fit_transform(reduced), "t-SNE"
    except Exception as exc:  # noqa: BLE001 - the map must not cost the report
        return _pca_2d(X), f"PCA (t-SNE failed: {type(exc).__name__})"


def _colour(i: int) -> str:
    return _PALETTE[i] if i < len(_PALETTE) else f"hsl({(i * 137.508) % 360:.0f}, 65%, 45%)"


def _scaled(xy: np.ndarray) -> np.ndarray:
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high - low > 1e-12, high - low, 1.0)
    unit = (xy - low) / span
    return np.column_stack(
        [_MARGIN + unit[:, 0] * (_WIDTH - 2 * _MARGIN), _MARGIN + (1 - unit[:, 1]) * (_HEIGHT - 2 * _MARGIN)]
    )


#: How a marked point is drawn: a larger circle with a dark ring, or a square with a red edge.
_SHAPES = {
    0: ('<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{c}"', "circle"),
    1: ('<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{c}" stroke="#000" stroke-width="2"', "ringed circle"),
    2: (
        '<rect x="{x0:.1f}" y="{y0:.1f}" width="10" height="10" fill="{c}" stroke="#d00" stroke-width="2"',
        "red-edged square",
    ),
}

#: Kinds of marked points, and the shape each is drawn with.
MISCLASSIFIED, FLAGGED = "misclassified", "flagged"
_SHAPE_OF = {MISCLASSIFIED: 1, FLAGGED: 2}

# Hover: one listener per map shows its tooltip with the point's thumbnail and text. The tooltip's <img> is made on
# the first hover, so a page that is only looked at holds no image without a source.
_SCRIPT = """<script>(function(){var m=document.getElementById('%s'),s=m.querySelector('svg'),t=m.querySelector('.emap-tip'),i,c;
s.addEventListener('mouseover',function(e){var p=e.target.closest('[data-c]');if(!p)return;var u=p.getAttribute('data-i');
if(!i){i=document.createElement('img');i.alt='';c=document.createElement('div');t.append(i,c)}
if(u){i.src=u;i.hidden=false}else{i.removeAttribute('src');i.hidden=true}c.textContent=p.getAttribute('data-c');
var r=m.getBoundingClientRect(),b=p.getBoundingClientRect();t.style.left=(b.right-r.left+6)+'px';t.style.top=(b.bottom-r.top+6)+'px';t.hidden=false});
s.addEventListener('mouseout',function(e){if(e.target.closest('[data-c]'))t.hidden=true})})();</script>"""

STYLE = """
.emap { position: relative; display: inline-block; } .emap svg { border: 1px solid #ccc; background: #fff; }
.emap [data-c] { cursor: pointer; } .emap [data-c]:hover { stroke: #000; stroke-width: 2; }
.emap-tip { position: absolute; z-index: 2; background: #fff; border: 1px solid #888; padding: 4px; max-width: 240px;
  font-size: 0.75em; white-space: pre-line; overflow-wrap: anywhere; pointer-events: none; box-shadow: 2px 2px 6px #0003; }
.emap-legend { font-size: 0.8em; max-width: 640px; } .emap-legend span { display: inline-block; margin-right: 1em; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; vertical-align: middle; }
"""


def map_html(embedding: Embedding, root: Path, marks: dict[str, str], thumbnails: int = MAX_THUMBNAILS) -> str:
    """The map as HTML (inline SVG, legend, tooltip, script); `marks` maps each kind of marked point
    (`MISCLASSIFIED`, `FLAGGED`) to its legend text; thumbnails read from `root`/relpath."""
    from bottleneck.inspect.report_figures import thumbnail_uri
    from bottleneck.text import shown as shown_text

    map_id = f"emap-{next(_map_ids)}"
    classes = sorted(set(embedding.labels))
    colour = {label: _colour(i) for i, label in enumerate(classes)}
    shape = {kind: _SHAPE_OF.get(kind, 1) for kind in marks}
    order = sorted(range(len(embedding.relpaths)), key=lambda i: (bool(embedding.kinds[i]), i))  # marked on top
    with_thumbnail = set(sorted(order, key=lambda i: (not embedding.kinds[i], i))[:thumbnails])
    points = []
    for i, (x, y) in zip(order, _scaled(embedding.xy)[order]):
        template = _SHAPES[shape.get(embedding.kinds[i], 0)][0]
        uri = thumbnail_uri(root / embedding.relpaths[i], THUMBNAIL_SIDE, quality=70) if i in with_thumbnail else None
        points.append(
            template.format(x=x, y=y, x0=x - 5, y0=y - 5, c=colour[embedding.labels[i]])
            + f' data-c="{html.escape(shown_text(embedding.captions[i]))}"'
            + (f' data-i="{uri}"' if uri else "")
            + "/>"
        )
    legend = [
        f'<span><i class="swatch" style="background:{colour[label]}"></i>{html.escape(shown_text(label))}</span>'
        for label in classes[:30]
    ]
    if len(classes) > 30:
        legend.append(f"<span>... and {len(classes) - 30} more labels</span>")
    legend += [f"<span>{_SHAPES[shape[kind]][1]}: {html.escape(text)}</span>" for kind, text in marks.items()]
    shown = len(embedding.relpaths)
    notes = [f"{embedding.method} of {embedding.of}, {shown} images"]
    if embedding.total > shown:
        notes.append(f"a seeded sample of {shown} of the {embedding.total} images (marked ones first)")
    if shown > thumbnails:
        notes.append(f"thumbnails on hover for {thumbnails} of them (marked ones first)")
    return (
        f'<div class="emap" id="{map_id}"><svg width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="embedding map">{"".join(points)}</svg>'
        '<div class="emap-tip" hidden></div>'
        f'<div class="emap-legend">{"".join(legend)}</div><p class="note">{html.escape("; ".join(notes))}; '
        f"hover over a point to see its image</p>{_SCRIPT % map_id}</div>"
    )


def audit_embedding(
    Z: np.ndarray, labels: list[str], relpaths: list[str], splits: list[str], flags: dict[str, list[str]], seed: int = 0
) -> Embedding:
    """The audit's map: every image (at most `MAX_POINTS`, flagged ones first) of the audit's projected features
    `Z`, flagged ones marked; `flags` maps each reason (label issue, outlier, ...) to the paths it flags."""
    reasons: dict[str, list[str]] = {}
    for reason, paths in flags.items():
        for path in dict.fromkeys(paths):
            reasons.setdefault(path, []).append(reason)
    kinds = [FLAGGED if path in reasons else "" for path in relpaths]
    chosen = choose_points(kinds, MAX_POINTS, seed)
    xy, method = project_2d(np.asarray(Z)[chosen], seed)
    captions = [
        f"{relpaths[i]}\n{labels[i] or '(no label)'}"
        + (f" ({splits[i]})" if splits[i] != "-" else "")
        + (f"\n{', '.join(reasons[relpaths[i]])}" if relpaths[i] in reasons else "")
        for i in chosen
    ]
    return Embedding(
        xy,
        [relpaths[i] for i in chosen],
        [labels[i] or "(no label)" for i in chosen],
        captions,
        [kinds[i] for i in chosen],
        method,
        len(relpaths),
        "the audit's standardised features, L2-normalised (its cosine distance)",
    )
