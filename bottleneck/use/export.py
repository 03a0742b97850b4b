"""`bottleneck export`: a trained run as files that load without this package, checked against `predict`.

    DIR/model.keras       pixels -> probabilities (backbone, preprocessing and head in one Keras model)
    DIR/saved_model/      TensorFlow SavedModel; `serving_default` takes encoded image bytes
                          (decoded in the graph exactly as `features` decodes), `serve_pixels` takes pixels
    DIR/model.tflite      optional (--tflite): float32 TFLite of pixels -> probabilities
    DIR/labels.txt        one label per output unit, in order

A multi-label run's artefacts give a sigmoid probability per label; the SavedModel also returns the
labels at or over their thresholds (chosen on the validation split, written to export.json too).
    DIR/README.md         how to call each, and the parity measured at export time
    DIR/export.json       the same figures, as data

Parity is measured, not assumed: the run's test images (and each of them re-encoded as JPEG and
as PNG) go through `predict` and through every exported artefact, and the largest difference in
any probability is written down.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bottleneck.backbones.build import import_tensorflow
from bottleneck.errors import BottleneckError, disk_full, is_disk_full, stop_if_interrupted
from bottleneck.features.decode import UnreadableImage, decode_image, read_image_file, to_rgb
from bottleneck.features.shards import is_file_or_member
from bottleneck.learn.classifier import INPUT_NAME, build_classifier
from bottleneck.learn.run_folder import LoadedRun, load_run
from bottleneck.learn.thresholds import Thresholds
from bottleneck.quiet import native_startup_quiet
from bottleneck.use.predict import predict_images

#: Probabilities of an export may differ from `predict`'s by at most this much (float32 arithmetic in another order).
PARITY_TOLERANCE = 1e-4
_EXPORT_MARK = "export.json"


class ExportError(BottleneckError):
    """The export cannot be written where asked."""


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    parity: dict = field(default_factory=dict)  # artefact -> input format -> {"images", "max_abs_diff"}
    seconds: float = 0.0

    @property
    def worst(self) -> float:
        diffs = [f["max_abs_diff"] for formats in self.parity.values() for f in formats.values() if f["images"]]
        return max(diffs, default=0.0)


def write_saved_model(model, labels: list[str], size: int, path: Path, thresholds: np.ndarray | None = None) -> None:
    """A SavedModel: `serving_default` (encoded bytes) and `serve_pixels` (float32 RGB 0-255) endpoints.

    With `thresholds` (multi-label, one per label) each also returns `given` ((n, k) booleans: the
    probability reaches the label's threshold) and `given_labels` (the label where given, else '').
    """
    tf, keras = import_tensorflow()
    from bottleneck.features.graph_decode import decode_batch_graph

    label_names = tf.constant(labels)

    def outputs(probabilities):
        count = tf.shape(probabilities)[0]
        found = {
            "probabilities": probabilities,
            "labels": tf.tile(label_names[None, :], [count, 1]),
            "top_label": tf.gather(label_names, tf.argmax(probabilities, axis=1)),
        }
        if thresholds is not None:
            given = probabilities >= tf.constant(thresholds, probabilities.dtype)[None, :]
            found.update(given=given, given_labels=tf.where(given, found["labels"], tf.constant("")))
        return found

    def from_bytes(images):
        return outputs(model(tf.cast(decode_batch_graph(images, size), tf.float32), training=False))

    def from_pixels(pixels):
        return outputs(model(pixels, training=False))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", from_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
    )
    archive.add_endpoint(
        "serve_pixels", from_pixels, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)]
    )
    archive.write_out(str(path), verbose=False)


def write_tflite(model, path: Path) -> None:
    """A float32 TFLite model of pixels -> probabilities (TFLite has no image decoding ops)."""
    tf, _ = import_tensorflow()
    # Keras' route (it exports a SavedModel first); converting a hand-made concrete function froze NaN weights.
    # It lists the endpoints it saved on stdout (not for our stdout), the converter's C++ notes on fd 2.
    with contextlib.redirect_stdout(io.StringIO()), native_startup_quiet():
        content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path.write_bytes(content)


def _test_images(run: LoadedRun, limit: int) -> list[Path]:
    data = run.data_dir or Path("")
    try:
        with open(run.folder / "split.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            rows = [row["path"] for row in csv.DictReader(handle) if row["split"] == "test"]
    except OSError:
        return []
    return [data / relpath for relpath in rows if is_file_or_member(data / relpath)][:limit]


def _reencoded(images: list[Path], folder: Path) -> dict[str, list[Path]]:
    """The test images as they are, and each re-encoded as JPEG and as PNG (so both paths are checked)."""
    from PIL import Image

    sets: dict[str, list[Path]] = {PARITY_FORMATS[0]: list(images), **{fmt: [] for fmt in PARITY_FORMATS[1:]}}
    for i, source in enumerate(images):
        try:
            with Image.open(io.BytesIO(read_image_file(source)[0])) as image:
                # The decoder's own conversion, as a new image: a palette's `transparency` carried into RGB's info
                # made PNG's encoder raise ("transparency for RGB must be list or tuple").
                rgb = Image.frombytes("RGB", image.size, to_rgb(image).tobytes())
            for fmt, ext in (("jpeg", "jpg"), ("png", "png")):
                target = folder / f"{i:05d}.{ext}"
                rgb.save(target, fmt.upper(), quality=90) if fmt == "jpeg" else rgb.save(target, "PNG")
                sets[fmt].append(target)
        except (OSError, ValueError, UnreadableImage, Image.DecompressionBombError):
            continue  # an image that cannot be re-encoded is measured as given only
    return sets


def _compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    difference = np.abs(reference - np.asarray(candidate, np.float64))
    worst = (
        float(np.max(difference, initial=0.0)) if np.isfinite(difference).all() else float("inf")
    )  # NaN is a failure
    return {"images": int(len(reference)), "max_abs_diff": worst}


#: The input formats parity is measured on: the test images as they are, and re-encoded (`_reencoded`).
PARITY_FORMATS = ("as given", "jpeg", "png")


def measure_parity(
    run: LoadedRun,
    out: Path,
    tflite: bool,
    limit: int,
    log: Callable[[str], None],
    stage: Callable[[str], None] = lambda name: None,
) -> dict:
    """Largest probability difference between `predict` and each artefact in `out`, per input format.

    `stage(name)` is told as each step begins (loading the artefacts, then each input format)."""
    stage("parity: loading the artefacts")
    tf, keras = import_tensorflow()
    images = _test_images(run, limit)
    if not images:
        log("note: the run's test images are not where it was trained from; parity is not measured")
        return {}
    size = run.spec.input_size
    keras_model = keras.saving.load_model(out / "model.keras", compile=False, safe_mode=True)
    serving = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    interpreter = None
    if tflite:
        import warnings

        # TF's notice that tf.lite moves to another package is not ours to act on; TFLite's C++ says which
        # delegate it created ("Created TensorFlow Lite XNNPACK delegate for CPU") on fd 2: to the native log.
        with warnings.catch_warnings(), native_startup_quiet():
            warnings.simplefilter("ignore", UserWarning)
            interpreter = tf.lite.Interpreter(model_path=str(out / "model.tflite"))
            interpreter.allocate_tensors()
    parity: dict = {"model.keras": {}, "saved_model": {}, **({"model.tflite": {}} if tflite else {})}
    with tempfile.TemporaryDirectory() as scratch:
        for fmt, paths in _reencoded(images, Path(scratch)).items():
            stop_if_interrupted()
            stage(f"parity: {fmt} ({len(paths)} images)")
            reference, usable = _predict_probabilities(run, paths)
            if not usable:
                continue
            encoded = [read_image_file(p)[0] for p in usable]
            pixels = np.stack([decode_image(data, size) for data in encoded]).astype(np.float32)
            parity["model.keras"][fmt] = _compare(reference, _keras_predict(keras_model, pixels))
            served, kept = _serve(tf, serving, encoded, len(run.labels))
            parity["saved_model"][fmt] = _compare(reference[kept], served["probabilities"])
            if len(kept) < len(encoded):
                parity["saved_model"][fmt]["refused"] = len(encoded) - len(kept)
                log(
                    f"note: the SavedModel refused {len(encoded) - len(kept)} of {len(encoded)} test images "
                    f"({fmt}): its graph decoder reads JPEG, PNG, GIF and BMP"
                )
            if run.thresholds is not None:  # the labels it gives, against those predict gives
                differ = (served["given"] != run.thresholds.decide(reference[kept])).any(axis=1)
                parity["saved_model"][fmt]["label_sets_differ"] = int(differ.sum())
            if interpreter is not None:
                parity["model.tflite"][fmt] = _compare(reference, _run_tflite(interpreter, pixels))
    return parity


def _serve(tf, serving, encoded: list[bytes], classes: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """The SavedModel's outputs for the images it accepts, and their positions in `encoded`.

    One batch first; if it is refused, one image at a time: the graph decoder fails a whole batch on one image
    in a format it does not read (a TIFF or a TGA that `predict` decodes)."""
    try:
        return {k: v.numpy() for k, v in serving(images=tf.constant(encoded)).items()}, list(range(len(encoded)))
    except tf.errors.InvalidArgumentError:
        pass
    kept, parts = [], []
    for i, data in enumerate(encoded):
        try:
            parts.append({k: v.numpy() for k, v in serving(images=tf.constant([data])).items()})
        except tf.errors.InvalidArgumentError:
            continue
        kept.append(i)
    if not parts:
        return {"probabilities": np.zeros((0, classes)), "given": np.zeros((0, classes), bool)}, []
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}, kept


def _predict_probabilities(run: LoadedRun, paths: list[Path]) -> tuple[np.ndarray, list[Path]]:
    """`predict`'s probabilities of `paths` (columns in label order) and the paths it could use."""
    result = predict_images(run, [str(p) for p in paths], top=len(run.labels))
    by_path = {prediction.path: dict(prediction.top) for prediction in result.predictions if prediction.error is None}
    usable = [path for path in paths if str(path) in by_path]  # predict lists a file reachable twice only once
    rows = [[by_path[str(path)][label] for label in run.labels] for path in usable]
    return np.array(rows, np.float64).reshape(len(usable), len(run.labels)), usable


def _keras_predict(model, pixels: np.ndarray) -> np.ndarray:
    """`model.predict(pixels)`'s numbers (its predict function, its batches of 32) without the tf.data pipeline
    `predict` builds on every call."""
    return np.concatenate([model.predict_on_batch(pixels[start : start + 32]) for start in range(0, len(pixels), 32)])


def _run_tflite(interpreter, pixels: np.ndarray) -> np.ndarray:
    given = interpreter.get_input_details()[0]["index"]
    taken = interpreter.get_output_details()[0]["index"]
    rows = []
    for image in pixels:
        interpreter.set_tensor(given, image[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(taken)[0].copy())
    return np.array(rows)


#: Everything an export writes; a folder holding anything else is not ours to replace.
EXPORT_FILES = frozenset({"model.keras", "saved_model", "labels.txt", "README.md", "model.tflite", _EXPORT_MARK})


def _check_replaceable(out: Path) -> None:
    """`out` may be replaced only if it is empty or holds exactly an earlier export's files; else one line."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not an earlier export; choose another --out or remove it")
    names = {entry.name for entry in out.iterdir()}
    if not names:
        return
    extra = sorted(names - EXPORT_FILES)
    if _EXPORT_MARK not in names or extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ExportError(
            f"{out} exists and is not an earlier export"
            + (f" (it also holds {shown})" if extra else "")
            + "; choose another --out or remove it"
        )


def _remove_killed_stagings(out: Path) -> None:
    """Remove the staging folders (`.NAME.<pid>.*`) that killed exports left beside `out`."""
    from bottleneck.fs import pid_named_folders, process_alive

    for entry, pid in pid_named_folders(out):
        if pid is not None and pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _writing_to(out: Path):
    """A write that fails (read-only, no permission, a full disk, in TensorFlow's words too) is one line naming `out`."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(out.parent) from None
        raise ExportError(f"cannot write the export to {out}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - TensorFlow reports a full disk as its own ResourceExhaustedError
        text = str(exc)
        if "No space left on device" in text or type(exc).__name__ == "ResourceExhaustedError":
            raise disk_full(out.parent) from None
        if (
            type(exc).__name__ in ("PermissionDeniedError", "FailedPreconditionError", "UnavailableError")
            or "Read-only file system" in text
        ):
            first = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ExportError(f"cannot write the export to {out}: {first}") from None
        raise


def _staging_for(out: Path) -> Path:
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_stagings(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))


def _readable_as_umask_allows(folder: Path) -> None:
    """mkdtemp makes 0700 folders; an export is for serving, possibly by another user: the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        try:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        except OSError:
            pass


class _Stages:
    """The export's progress: one step per stage (and per input format of the parity check), named as it starts."""

    def __init__(self, tflite: bool, progress: bool, log: Callable[[str], None]):
        from bottleneck.features.engines.local import make_bar

        # building the model, model.keras, SavedModel, [TFLite], loading the artefacts, then each input format
        self.total = 4 + int(tflite) + len(PARITY_FORMATS)
        self.bar = make_bar(self.total, progress, unit="step", desc="export")
        self.log = self.bar.write if progress else log  # a line printed under the bar, not through it
        self.done = -1  # no stage has started

    def start(self, name: str) -> None:
        """`name` begins: the stage before it is done."""
        stop_if_interrupted()  # between stages: TensorFlow runs Python callbacks inside C, where a SIGTERM can vanish
        if self.done >= 0:
            self.bar.update(1)
        self.done += 1
        self.bar.set_description_str(f"export: {name}")

    def finish(self) -> None:
        """Every stage is done (the parity check may have had fewer steps: no test images found)."""
        stop_if_interrupted()
        self.bar.update(self.total - max(self.done, 0))
        self.bar.set_description_str("export")
        self.close()

    def close(self) -> None:
        self.bar.close()


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    tflite: bool = False,
    check_images: int = 32,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = False,
) -> ExportResult:
    """Write the run's exports into `out` (whole or not at all) and measure their parity with `predict`.

    `progress`: a bar on stderr naming each stage (building the model, model.keras, SavedModel, TFLite,
    the parity check per input format), with the time left."""
    started = time.monotonic()
    run = load_run(run_dir, cache_dir)
    out = Path(out)
    with _writing_to(out):
        staging = _staging_for(out)
    stages = _Stages(tflite, progress, log)
    if run.spec.precision in ("bf16", "int8"):
        stages.log(
            f"note: this run's head learnt from {run.spec.precision} features (OpenVINO); the export computes "
            "them in float32, as TensorFlow does everywhere: the parity below measures the difference"
        )
    try:
        with _writing_to(out):
            stages.start("building the model")
            model = build_classifier(run)
            stages.start("model.keras")
            model.save(staging / "model.keras")
            stages.start("SavedModel")
            write_saved_model(
                model,
                run.labels,
                run.spec.input_size,
                staging / "saved_model",
                run.thresholds.values if run.thresholds is not None else None,
            )
            (staging / "labels.txt").write_text("".join(f"{label}\n" for label in run.labels), encoding="utf-8")
            if tflite:
                stages.start("TFLite")
                write_tflite(model, staging / "model.tflite")
            parity = measure_parity(run, staging, tflite, check_images, stages.log, stages.start)
            stages.finish()
            result = ExportResult(out, sorted(p.name for p in staging.iterdir()) + ["README.md", _EXPORT_MARK], parity)
            summary = {
                "run": str(run.folder.absolute()),
                "labels": run.labels,
                "input_size": run.spec.input_size,
                "backbone": run.fingerprint,
                "parity": parity,
                "tolerance": PARITY_TOLERANCE,
                "pretrained": run.spec.pretrained,
                "warning": "" if run.spec.pretrained else run.spec.random_weights_warning,
                "multi_label": run.multi_label,
            }
            if run.thresholds is not None:
                summary["thresholds"] = run.thresholds.record()
            (staging / _EXPORT_MARK).write_text(json.dumps(summary, indent=2))
            (staging / "README.md").write_text(export_readme(run, parity, tflite))
            _readable_as_umask_allows(staging)
            _check_replaceable(out)  # again: a file may have been put there while the export ran
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)  # the export appears whole or not at all
    finally:
        stages.close()
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def parity_rows(parity: dict) -> list[list[str]]:
    rows = [["artefact", "input", "images", "max |p - predict|"]]
    for artefact, formats in parity.items():
        for fmt, figures in formats.items():
            images = str(figures["images"]) + (f" ({figures['refused']} refused)" if figures.get("refused") else "")
            rows.append([artefact, fmt, images, f"{figures['max_abs_diff']:.2e}"])
    return rows


def _multi_label_readme(labels: list[str], thresholds: Thresholds, parity: dict) -> str:
    """The paragraph on a multi-label run's outputs and thresholds."""
    shown = ", ".join(f"`{label}` {value:.4f}" for label, value in zip(labels, thresholds.values))
    differ = [
        f"{fmt} {figures['label_sets_differ']} of {figures['images']}"
        for fmt, figures in parity.get("saved_model", {}).items()
        if "label_sets_differ" in figures
    ]
    return f"""
Multi-label: each output is its own label's probability (a sigmoid, they do not sum to 1). An image
gets every label whose probability reaches that label's threshold, chosen on the run's validation
split: {shown} (also in `export.json`). The SavedModel applies them: its outputs `given` ((n, labels)
booleans) and `given_labels` (the label where given, else '') are the labels `bottleneck predict` gives.
""" + (
        f"Images whose label set from `serving_default` differs from predict's: {', '.join(differ)}.\n"
        if differ
        else ""
    )


def export_readme(run: LoadedRun, parity: dict, tflite: bool) -> str:
    """How to call each artefact, and what was measured."""
    size = run.spec.input_size
    warning = "" if run.spec.pretrained else f"\n**WARNING: {run.spec.random_weights_warning}.**\n"
    table = (
        "\n".join(
            "| " + " | ".join(row) + " |" + ("\n|---|---|---|---|" if i == 0 else "")
            for i, row in enumerate(parity_rows(parity))
        )
        if parity
        else "Not measured: the run's test images were not found."
    )
    multi_label = "" if run.thresholds is None else _multi_label_readme(run.labels, run.thresholds, parity)
    tflite_text = (
        f"""
## model.tflite (float32)

```python
import numpy as np, tensorflow as tf
interpreter = tf.lite.Interpreter(model_path="model.tflite"); interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels[None])  # (1, {size}, {size}, 3) float32
interpreter.invoke(); probabilities = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
```
"""
        if tflite
        else ""
    )
    return f"""# Exported classifier: run {run.run_id}

Labels (one per output unit, in order): `labels.txt`. Backbone `{run.fingerprint}`, input {size}x{size} RGB.
{warning}{multi_label}
## saved_model/ (TensorFlow Serving, or `tf.saved_model.load`)

`serving_default` takes a batch of encoded images (JPEG, PNG, GIF, BMP bytes) and decodes them in the
graph exactly as `bottleneck` does (EXIF orientation, JPEG DCT scaling, Pillow's bilinear resize).

```python
import tensorflow as tf
serve = tf.saved_model.load("saved_model").signatures["serving_default"]
out = serve(images=tf.constant([open("photo.jpg", "rb").read()]))
out["probabilities"], out["top_label"], out["labels"]
```

`serve_pixels` takes float32 `(n, {size}, {size}, 3)` RGB values in 0-255 instead.

## model.keras (Keras 3)

The pixels must be decoded as `bottleneck` decodes them, or the probabilities move (skipping the JPEG
draft step and the EXIF rotation moved them by 0.047; with them, 2.7e-7). With Pillow and NumPy:

```python
import keras, numpy as np
from PIL import Image, ImageOps

def pixels_of(path, size={size}):
    image = Image.open(path)
    if image.format == "JPEG":
        image.draft(image.mode, (2 * size, 2 * size))  # the JPEG decoder's DCT scaling, as bottleneck does
    image.load()
    image = ImageOps.exif_transpose(image)  # EXIF orientation
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # transparency onto white
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32)  # RGB 0-255

model = keras.saving.load_model("model.keras", safe_mode=True)
probabilities = model.predict(np.stack([pixels_of("photo.jpg")]))  # (n, {size}, {size}, 3) float32
```

(16-bit, CMYK and float images need `bottleneck`'s own conversions; `saved_model` does all of it for you.)
{tflite_text}
## Parity with `bottleneck predict`, measured at export

The run's test images, as given and re-encoded as JPEG and as PNG, through `bottleneck predict` and
through each artefact: the largest difference in any probability (tolerance {PARITY_TOLERANCE:g}).

{table}
"""
