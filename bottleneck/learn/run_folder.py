"""The run folder, the one owner of its format: written (atomically) and read back here.

Writing: `prepare_runs_dir`, `new_run` (a staging folder renamed whole), `write_run_record`
(config.json, metrics.json), `write_predictions_csv` (test_predictions.csv); `train-head` and
`fine-tune` write through these. Reading: `read_run_files`, `load_run`, `read_run_json`,
`run_path`, `backbone_fingerprint`, used by predict, export, fine-tune, the report and `cache gc`.

`predict`, `export` and `fine-tune` all start from `load_run`. A head run classifies the cached features of
its backbone (a multi-label run gives each label its own probability, decided by the thresholds
beside its head); a fine-tuned run holds a whole network (pixels in, probabilities out), whose
outputs are cached like features under their own fingerprint, so both kinds share one pipeline.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bottleneck import naming
from bottleneck.backbones.spec import BackboneSpec, spec_from_record, spec_from_store_attrs
from bottleneck.errors import BottleneckError, CacheError, DataError
from bottleneck.fs import process_alive
from bottleneck.learn.thresholds import Thresholds

#: config.json "kind" of a run written by `fine-tune`.
FINE_TUNED = "fine-tune"
#: How fine-tuned runs before `fine_tuned_from` marked their fingerprint ("<fp> fine-tuned"): still read.
OLD_FINE_TUNED_SUFFIX = " fine-tuned"


class RunError(BottleneckError):
    """A run folder is missing, incomplete, or no longer matches what it was trained with."""


# ---------------------------------------------------------------------------------------------
# Writing a run folder: every file of it is written here (train-head's and fine-tune's runs alike)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
#: The test split's predictions of a run, which `predict` reproduces.
PREDICTIONS_FILE = "test_predictions.csv"
PROBABILITY_PREFIX = "probability_"  # of the per-class columns in PREDICTIONS_FILE


def prepare_runs_dir(runs_dir: str | os.PathLike) -> Path:
    """Make sure run folders can be written to `runs_dir` (before any training), and clear what killed runs left."""
    runs = Path(runs_dir)
    try:
        runs.mkdir(parents=True, exist_ok=True)
        probe = runs / f".write-test-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise DataError(f"cannot write run folders to --runs {runs}: {exc.strerror or exc}") from None
    _remove_abandoned_staging(runs)
    return runs


def _remove_abandoned_staging(runs: Path) -> None:
    """`.RUN.PID.tmp` folders whose process is gone: a run killed while writing its folder."""
    for staging in runs.glob(naming.TEMPORARY_GLOB):
        pid = naming.temporary_pid(staging.name)
        if staging.is_dir() and pid is not None and not process_alive(pid):
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def new_run(runs: Path, kind: str) -> Iterator[tuple[Path, Path]]:
    """(the final run folder, the staging folder to write its files in): when the block ends, the staging
    folder is renamed to the final one in one step (a run folder appears whole or not at all); when it
    raises, the staging folder is removed."""
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(2)}"
    final = runs / run_id
    staging = naming.temporary_path(final)
    staging.mkdir(parents=True)
    try:
        yield final, staging
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_run_json(path: Path):
    """One JSON file of a run folder, or a `DataError` saying in a few words why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"its {path.name} is not UTF-8 text") from None
    except ValueError as exc:
        raise DataError(f"its {path.name} is damaged ({exc})") from None
    except OSError as exc:
        raise DataError(f"cannot read its {path.name} ({exc.strerror or exc})") from None


def write_run_record(staging: Path, config: dict, metrics: dict) -> None:
    """A run's config.json (how it was made: command, data, backbone, labels) and metrics.json (its scores)."""
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))


LR_FIND_FILE = "lr_find.json"  # fine-tune --learning-rate auto: the finder's curve (and lr_find.png, its plot)


def write_lr_find(staging: Path, curve: dict) -> None:
    """The learning-rate finder's sweep: its numbers as lr_find.json and their plot as lr_find.png."""
    (staging / LR_FIND_FILE).write_text(json.dumps(curve, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.plot(curve["rates"], curve["smoothed"], label="smoothed training loss")
    axes.axvline(curve["chosen"], color="tab:red", linestyle="--", label=f"chosen {curve['chosen']:.2g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="loss", title="learning-rate finder")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(staging / "lr_find.png", dpi=80)
    plt.close(figure)


def relative_paths(run_folder: Path, **paths: str | os.PathLike | None) -> dict[str, str]:
    """Each path relative to the run folder: what the run finds them by once the project folder has moved."""
    return {
        key: os.path.relpath(Path(path).absolute(), run_folder.absolute())
        for key, path in paths.items()
        if path is not None
    }


def write_predictions_csv(
    path: Path,
    paths: list[str],
    labels: list[str],
    proba: np.ndarray,
    classes: list[str],
    thresholds: Thresholds | None = None,
) -> None:
    """`test_predictions.csv`: path, true label, predicted label and the probability of every class.

    Probability columns are `probability_<class>`, so a class named `path` or `label` is no second
    column of that name. With `thresholds` (multi-label), label and predicted are label sets (`a;b`):
    the true ones and those at or over their thresholds.
    """
    from bottleneck.features.label_file import joined_labels

    def predicted(row: list[float]) -> str:
        if thresholds is None:
            return classes[int(np.argmax(row))]
        return joined_labels(tuple(sorted(label for label, _ in thresholds.labels_above(np.array(row)))))

    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "predicted", *(PROBABILITY_PREFIX + name for name in classes)])
        for relpath, label, row in sorted(zip(paths, labels, proba.tolist()), key=lambda item: item[0]):
            writer.writerow([relpath, label, predicted(row), *(repr(float(p)) for p in row)])


def read_test_predictions(folder: Path) -> dict[str, tuple[str, str]] | None:
    """{path: (true label, predicted)} of a single-label run's test_predictions.csv, or None when the
    file is missing or not as `write_predictions_csv` writes it (`read_predictions_csv` says why)."""
    try:
        predictions = read_predictions_csv(folder)
    except RunError:
        return None
    return dict(zip(predictions.paths, zip(predictions.labels, predictions.predicted)))


@dataclass
class LoadedRun:
    """A run folder and what using it needs."""

    folder: Path
    config: dict
    spec: BackboneSpec  # the network whose outputs are cached: the backbone, or the fine-tuned network
    fingerprint: str  # of `spec`, computed once (it hashes model and weights files)
    cache_dir: Path
    labels: list[str]
    classify: Callable[[np.ndarray], np.ndarray]  # (n, d) cached outputs -> (n, len(labels)) probabilities
    thresholds: Thresholds | None = None  # multi-label runs: which probabilities give a label
    data_dir: Path | None = None  # the images it was trained on (found relative to the run when the project moved)

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    @property
    def fine_tuned(self) -> bool:
        return self.config.get("kind") == FINE_TUNED

    @property
    def run_id(self) -> str:
        return self.folder.name


def read_run_files(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """The run folder and its config, or a one-line `RunError` saying what is missing."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise RunError(f"run folder not found: {folder}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        json.loads((folder / METRICS_FILE).read_text())
    except FileNotFoundError as exc:
        raise RunError(f"{folder} is not a finished run folder ({Path(exc.filename).name} is missing)") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{folder} is not a readable run folder ({exc})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise RunError(f"{folder}/{CONFIG_FILE} does not describe a run (no 'model')")
    if not (folder / config["model"]).is_file():
        raise RunError(f"{folder} is incomplete: its model file {config['model']} is missing")
    return folder, config


def run_path(folder: Path, config: dict, key: str) -> Path | None:
    """The path the run recorded under `key` ('data', 'store', 'cache'); when it is gone (the project folder moved,
    or the run was sent elsewhere), the same path relative to the run folder, if that exists."""
    recorded = config.get(key)
    if not isinstance(recorded, str) or not recorded:
        return None
    written = Path(recorded)
    relatives = config.get("relative")
    relative = relatives.get(key) if isinstance(relatives, dict) else None
    if written.exists() or not isinstance(relative, str):
        return written
    moved = Path(os.path.normpath(folder.absolute() / relative))
    return moved if moved.exists() else written


def kept_backbone_file(folder: Path, config: dict, cache_dir: Path | None = None) -> Path | None:
    """The `.keras` backbone (or an application's `--weights` file) a run keeps by content: relative to the run
    folder, then in the cache's `backbones/`, then at the path it was trained from; each only if its content is
    the one trained on. None for runs that keep none (ImageNet or random weights, pixels, runs written before
    backbones were kept)."""
    from bottleneck.backbones.kept import first_with_content, kept_path

    kept = config.get("backbone_file")
    if not isinstance(kept, dict) or not isinstance(kept.get("sha256"), str):
        return None
    sha256, suffix = kept["sha256"], str(kept.get("suffix", ".keras"))
    cache_dir = cache_dir or run_cache(folder, config)
    candidates = [
        Path(os.path.normpath(folder.absolute() / str(kept.get("path", "")))),
        kept_path(cache_dir, sha256, suffix),
    ]
    if isinstance(kept.get("hint"), str):
        candidates.append(Path(kept["hint"]))
    candidates = list(dict.fromkeys(candidates))
    found = first_with_content(candidates, sha256)
    if found is None:
        shown = Path(str(kept.get("hint") or f"{kept.get('name')}{suffix}")).name
        raise RunError(
            f"the backbone of run {folder.name} ({shown}, sha256 {sha256[:12]}) is found "
            f"nowhere: looked at {', '.join(map(str, candidates))} (missing, or other content); copy the "
            f"cache's {kept_path(cache_dir, sha256).parent.name}/ folder with the run, or pass --cache"
        )
    return found


def run_backbone(folder: Path, config: dict, cache_dir: Path | None = None) -> tuple[BackboneSpec, str]:
    """The exact backbone a head run was trained on, and its fingerprint; a `RunError` if it changed since.

    A `.keras` backbone is the copy the run keeps by content (see `kept_backbone_file`), looked for in
    `cache_dir` (default: the run's cache)."""
    record = config.get("backbone_spec")
    kept = kept_backbone_file(folder, config, cache_dir)
    if record and kept is not None and config["backbone_file"].get("role") == "weights":
        record = {**record, "weights": str(kept)}  # the application is named; its weights file is the kept copy
    elif record and kept is not None:
        record = {**record, "architecture": str(kept), "file_stem": config["backbone_file"].get("name")}
    try:
        spec = spec_from_record(record) if record else spec_from_store_attrs(config.get("backbone") or {})
    except KeyError as exc:
        raise RunError(f"{folder}/config.json does not say which backbone it used (no {exc})") from None
    except BottleneckError as exc:
        raise RunError(f"the backbone of run {folder.name} cannot be rebuilt: {exc}") from None
    recorded, fingerprint = config.get("fingerprint"), spec.fingerprint()
    if recorded and fingerprint != recorded:
        raise RunError(
            f"the backbone of run {folder.name} has changed since training ({fingerprint} now, {recorded} "
            "then): its model or weights file was edited or replaced"
        )
    return spec, fingerprint


def backbone_fingerprint(config: dict) -> str:
    """The fingerprint of the backbone a run learnt from; for a fine-tuned run, the one it started from."""
    recorded = config.get("fine_tuned_from")
    if isinstance(recorded, dict) and isinstance(recorded.get("fingerprint"), str):
        return recorded["fingerprint"]
    return str(config.get("fingerprint") or "").removesuffix(OLD_FINE_TUNED_SUFFIX)


def run_cache(folder: Path, config: dict) -> Path:
    """The cache the run's features are in: a fine-tuned run's `cache`, a head run's store's folder."""
    if config.get("kind") == FINE_TUNED:
        return run_path(folder, config, "cache") or Path(config["cache"])
    return (run_path(folder, config, "store") or Path(config["store"])).parent


def _expected_width(config: dict) -> int | None:
    width = (config.get("backbone") or {}).get("feature_dim")
    return int(width) if isinstance(width, (int, float)) and not isinstance(width, bool) else None


def _check_head_fits(folder: Path, name: str, labels: list[str], width: int | None, config: dict) -> None:
    """The head's classes are the run's labels and its input is the backbone's feature width; else one line."""
    recorded = config.get("labels")
    if isinstance(recorded, list) and [str(label) for label in recorded] != labels:
        raise RunError(
            f"{folder / name} classifies {', '.join(labels)}, but the run was trained on "
            f"{', '.join(map(str, recorded))}: the head belongs to another run"
        )
    expected = _expected_width(config)
    if expected is not None and width is not None and width != expected:
        raise RunError(
            f"{folder / name} takes {width} features, but the run's backbone gives {expected}: "
            "the head belongs to another run"
        )


def _logreg_classifier(folder: Path, config: dict) -> tuple[list[str], Callable]:
    from bottleneck.learn.head_file import HEAD_FILE, HeadFileError, load_head

    if config["model"] != HEAD_FILE:
        raise RunError(
            f"{folder} keeps its head as a pickle ({config['model']}), which bottleneck does not load: "
            "a pickle runs code when it is opened; train the head again (runs now keep plain arrays, "
            f"{HEAD_FILE})"
        )
    try:
        head = load_head(folder / HEAD_FILE)
    except HeadFileError as exc:
        raise RunError(str(exc)) from None
    _check_head_fits(folder, HEAD_FILE, head.labels, head.feature_dim, config)
    _check_head_kind(folder / HEAD_FILE, head.multi_label, config)
    return head.labels, head.predict_proba if head.multi_label else head.to_pipeline().predict_proba


def _knn_classifier(folder: Path, config: dict) -> tuple[list[str], Callable]:
    from bottleneck.learn.head_file import HEAD_FILE, HeadFileError, load_knn

    try:
        head = load_knn(folder / HEAD_FILE)
    except HeadFileError as exc:
        raise RunError(str(exc)) from None
    _check_head_fits(folder, HEAD_FILE, head.labels, head.feature_dim, config)
    return head.labels, head.to_head().predict_proba


def _check_head_kind(path: Path, sigmoid: bool, config: dict) -> None:
    """A multi-label run's head gives one sigmoid per label, a single-label run's a softmax; else one line."""
    if sigmoid != bool(config.get("multi_label")):
        raise RunError(
            f"{path} is a {'sigmoid (multi-label)' if sigmoid else 'softmax'} head, but the run is "
            f"{'multi-label' if config.get('multi_label') else 'single-label'}: the head belongs to another run"
        )


def _keras_classifier(path: Path, config: dict) -> tuple[list[str], Callable]:
    from bottleneck.backbones.backend import import_keras

    keras = import_keras()  # a Dense head: any backend loads it
    labels = _labels(path.parent)
    try:
        # safe_mode refuses Lambda layers (code stored in the file); anything else unreadable is one line too.
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a file that is not its model
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RunError(f"{path} is not a Keras head this run can load ({text})") from None
    outputs = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    inputs = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None
    if outputs is not None and outputs != len(labels):
        raise RunError(
            f"{path} gives {outputs} probabilities, but {path.parent / 'labels.json'} lists {len(labels)} "
            "labels: the head or the labels belong to another run"
        )
    _check_head_fits(path.parent, path.name, labels, inputs, config)
    last = model.layers[-1].get_config().get("activation") if getattr(model, "layers", None) else None
    if last in ("sigmoid", "softmax"):
        _check_head_kind(path, last == "sigmoid", config)
    return labels, lambda X: np.asarray(
        model.predict(np.asarray(X, np.float32), batch_size=1024, verbose=0), np.float64
    )


def _labels(folder: Path) -> list[str]:
    try:
        labels = json.loads((folder / "labels.json").read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{folder} is incomplete: cannot read labels.json ({exc.__class__.__name__})") from None
    if not isinstance(labels, list) or not labels:
        raise RunError(f"{folder}/labels.json does not list the labels")
    return [str(label) for label in labels]


def _normalised(outputs: np.ndarray) -> np.ndarray:
    outputs = np.asarray(outputs, np.float64)
    return outputs / outputs.sum(axis=1, keepdims=True)


def load_run(run_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> LoadedRun:
    """Read a run folder; `cache_dir` overrides where its cached features live (default: where it was trained)."""
    folder, config = read_run_files(run_dir)
    if config.get("kind") == FINE_TUNED:
        network = folder / config["model"]
        spec = BackboneSpec(architecture=str(network.absolute()), layer=config["output_layer"], preprocess="none")
        fingerprint = spec.fingerprint()
        labels = _labels(folder)
        classify: Callable = _normalised
    else:
        spec, fingerprint = run_backbone(folder, config, Path(cache_dir) if cache_dir else None)
        head = config.get("head")
        if head == "logreg":
            labels, classify = _logreg_classifier(folder, config)
        elif head == "knn":
            labels, classify = _knn_classifier(folder, config)
        elif head == "keras":
            labels, classify = _keras_classifier(folder / config["model"], config)
        else:
            raise RunError(f"{folder}/config.json names an unknown head {head!r}")
    thresholds = _run_thresholds(folder, labels) if config.get("multi_label") else None
    return LoadedRun(
        folder,
        config,
        spec,
        fingerprint,
        Path(cache_dir) if cache_dir else run_cache(folder, config),
        labels,
        classify,
        thresholds,
        run_path(folder, config, "data"),
    )


def _run_thresholds(folder: Path, labels: list[str]) -> Thresholds:
    from bottleneck.learn.thresholds import ThresholdsError, read_thresholds

    try:
        return read_thresholds(folder, labels)
    except ThresholdsError as exc:
        raise RunError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Reading what a run was trained and tested on, for the report's pictures

SPLIT_FILE = "split.csv"


@dataclass
class Predictions:
    """A run's `test_predictions.csv`: each test image's path, true and predicted label, and probabilities."""

    paths: list[str]
    labels: list[str]
    predicted: list[str]
    classes: list[str]
    proba: np.ndarray  # (n, len(classes))


def read_predictions_csv(folder: Path) -> Predictions:
    """The run's test predictions; a `RunError` saying in one line why they cannot be read."""
    path = Path(folder) / PREDICTIONS_FILE
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise RunError(f"cannot read its {PREDICTIONS_FILE} ({exc.strerror or exc})") from None
    except csv.Error as exc:
        raise RunError(f"its {PREDICTIONS_FILE} is not CSV ({exc})") from None
    header = rows[0] if rows else []
    if header[:3] != ["path", "label", "predicted"] or not all(c.startswith(PROBABILITY_PREFIX) for c in header[3:]):
        raise RunError(f"its {PREDICTIONS_FILE} does not start with path,label,predicted,{PROBABILITY_PREFIX}...")
    body = [row for row in rows[1:] if row]
    try:
        proba = np.array([[float(p) for p in row[3:]] for row in body], np.float64).reshape(len(body), len(header) - 3)
    except ValueError:
        raise RunError(f"its {PREDICTIONS_FILE} has a row whose probabilities are not numbers") from None
    return Predictions(
        [r[0] for r in body],
        [r[1] for r in body],
        [r[2] for r in body],
        [c[len(PROBABILITY_PREFIX) :] for c in header[3:]],
        proba,
    )


@dataclass
class RunImages:
    """The images of a run's split.csv that the cache still has features for, and where to read those."""

    root: Path  # the images' folder: their paths are relative to it
    relpaths: list[str]
    labels: list[str]
    splits: list[str]
    rows: np.ndarray  # each image's row in `store`
    store: Any  # a snapshot of the FeatureStore the run learnt from
    left_out: int = 0  # rows of split.csv whose file or features are gone

    def features(self, positions) -> np.ndarray:
        """(len(positions), d) float32 features of the images at `positions`, read from the store."""
        return np.asarray(self.store.read_rows_at(self.rows[np.asarray(positions, np.int64)]), np.float32)


def run_images(folder: Path, config: dict) -> RunImages:
    """The run's images (split.csv) matched to its cached features by content; a `RunError` in one line when the
    run was fine-tuned, or its split.csv, DATA or cache is gone."""
    from bottleneck.features.maintenance import store_of
    from bottleneck.learn.dataset import content_hashes
    from bottleneck.learn.splits import read_split_csv

    if config.get("kind") == FINE_TUNED:
        raise RunError("a fine-tuned run caches its own outputs, not backbone features")
    if not isinstance(config.get("store"), str):
        raise RunError(f"its {CONFIG_FILE} names no feature store")
    try:
        rows = read_split_csv(folder / SPLIT_FILE)
    except DataError as exc:
        raise RunError(str(exc)) from None
    root = run_path(folder, config, "data")
    labels_file = config.get("labels_file")
    if root is None and isinstance(labels_file, str):
        root = Path(labels_file).parent
    if root is None or not root.exists():
        raise RunError(f"its images are not found (DATA {root or 'not recorded'} is gone)")
    store_path = run_path(folder, config, "store") or Path(config["store"])
    cache, fingerprint = store_path.parent, naming.fingerprint_of(store_path)
    if not cache.is_dir():
        raise RunError(f"its feature cache {cache} is gone")
    try:
        store = store_of(cache, fingerprint).snapshot()
        relpaths = sorted(rows)
        hashes = content_hashes(root, cache, relpaths)
        stored = store.rows_by_hash()
    except (BottleneckError, OSError) as exc:
        raise RunError(f"its feature cache {cache} cannot be read ({exc})") from None
    keep = [i for i, h in enumerate(hashes) if h and h in stored]
    if not keep:
        raise RunError(f"none of its {len(relpaths)} images has features in {store_path} any more")
    return RunImages(
        root,
        [relpaths[i] for i in keep],
        [rows[relpaths[i]][0] for i in keep],
        [rows[relpaths[i]][1] for i in keep],
        np.array([stored[hashes[i]] for i in keep], np.int64),
        store,
        len(relpaths) - len(keep),
    )


def referenced_fingerprints(runs_dirs: Iterable[str | os.PathLike]) -> set[str]:
    """The store fingerprints the runs under `runs_dirs` were trained on (their augmented views' stores too)."""
    found: set[str] = set()
    for runs in runs_dirs:
        folder = Path(runs)
        if not folder.is_dir():
            raise CacheError(f"--runs {folder} is not a folder of runs")
        for config in folder.rglob(CONFIG_FILE):
            try:
                recorded = json.loads(config.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(recorded, dict):
                if backbone_fingerprint(recorded):
                    found.add(backbone_fingerprint(recorded))
                if recorded.get("store"):
                    found.add(Path(str(recorded["store"])).stem)
                augment = recorded.get("augment")
                if isinstance(augment, dict) and augment.get("store"):
                    found.add(Path(str(augment["store"])).stem)
    return found
