#!/usr/bin/env python
"""`make bench-precision`: what bf16 and int8 features cost in accuracy, on the demo's transfer task.

The demo's two bases (pretrained here on digits 0-4, and on the even-numbered digits 0-9) are
transferred to its target, digits 5-9 on the odd-numbered images. For each base, the target's
features are computed in float32 (OpenVINO, checked against Keras), int8 (NNCF, calibrated on the
base's own source images, so no target image is seen), bf16 with OpenVINO where the CPU has it, and
bf16 emulated with Keras' mixed_bfloat16 policy on every layer (bfloat16 inputs, weights and
products, float32 variables; how close OpenVINO's own bf16 comes can be checked on a CPU that has it). For each: the
features' relative error against float32, the agreement of each test image's nearest training
neighbour, and a logreg head's test accuracy on two splits: the demo's (10 labelled images per
class) and half the images labelled, half tested (seeded, 50/50).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def decoded(images, size: int) -> np.ndarray:
    from bottleneck.features.decode import decode_image

    return np.stack([decode_image(image.path.read_bytes(), size) for image in images])


def batched(model, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(model(pixels[i : i + batch]), np.float32) for i in range(0, len(pixels), batch)])


def emulated_bf16(spec, pixels: np.ndarray) -> np.ndarray:
    """Features of the base with every layer under Keras' mixed_bfloat16 policy (bfloat16 inputs, weights and
    products, float32 variables), rebuilt from the model file's own config (a file's layers keep their policy)."""
    from bottleneck.backbones.backend import import_keras

    keras = import_keras()
    full = keras.saving.load_model(spec.architecture, compile=False, safe_mode=True)
    config = json.loads(full.to_json())

    def to_bf16(node) -> None:
        if isinstance(node, dict):
            if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
                node["config"]["name"] = "mixed_bfloat16"
            for value in node.values():
                to_bf16(value)
        elif isinstance(node, list):
            for value in node:
                to_bf16(value)

    to_bf16(config)
    clone = keras.models.model_from_json(json.dumps(config))
    clone.set_weights(full.get_weights())
    output = clone.get_layer(spec.layer).output
    if len(output.shape) == 4:
        output = keras.layers.GlobalAveragePooling2D(dtype="float32")(output)
    network = keras.Model(clone.inputs, output)
    assert spec.preprocess in (None, "none"), "the demo's bases rescale their input themselves"
    return batched(lambda batch: np.asarray(network(batch.astype(np.float32), training=False), np.float32), pixels)


def nearest_neighbour_agreement(exact: np.ndarray, approx: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """The share of test images whose nearest training image (cosine) is the same in both feature sets."""

    def nearest(features):
        unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return np.argmax(unit[test] @ unit[train].T, axis=1)

    return float(np.mean(nearest(exact) == nearest(approx)))


def test_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    from bottleneck.learn.heads import make_head

    head = make_head("logreg").fit(features[train], labels[train])
    return float(np.mean(head.predict(features[test]) == labels[test]))


def splits(images, target: Path, split_file: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (train mask, test mask)}: the demo's split file, and a seeded half-and-half split."""
    from bottleneck.learn.splits import SplitConfig, assign_splits, read_split_csv

    recorded = read_split_csv(split_file)
    demo = np.array([recorded[image.relpath][1] if image.relpath in recorded else "" for image in images])
    default = assign_splits([(image.relpath, image.label) for image in images], SplitConfig(val_pct=0, test_pct=50))
    drawn = np.array([default[image.relpath] for image in images])
    return {
        "demo split (10 labels per class)": (demo == "train", demo == "test"),
        "half labelled (50/50)": (drawn == "train", drawn == "test"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cache/bench-precision", help="work folder (bases, digits, cache)")
    args = parser.parse_args()
    from bottleneck.backbones.openvino import cpu_capabilities, cpu_flags
    from bottleneck.backbones.runtime import get_feature_model
    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.demo import SOURCES, DemoConfig, _bases, _prepare_digits
    from bottleneck.features.calibration import settle_calibration
    from bottleneck.features.discover import discover_images

    work = Path(args.out)
    cache = work / "cache"
    config = DemoConfig()
    sources, target, split_file = _prepare_digits(work, config, print)
    bases = _bases(work, sources, target, split_file, config, print)
    images = discover_images(target).images
    labels = np.array([image.label for image in images])
    masks = splits(images, target, split_file)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni", "avx2"))),
        "openvino_capabilities": list(cpu_capabilities()),
        "bases": {},
    }
    for source in SOURCES:
        spec = BackboneSpec(architecture=str(bases[source.key]), layer="features")
        pixels = decoded(images, spec.input_size)
        exact = batched(get_feature_model(spec, "openvino", cache), pixels)
        variants = {"float32 (Keras)": batched(get_feature_model(spec, "keras"), pixels)}
        started = time.monotonic()
        int8 = settle_calibration(
            replace(spec, precision="int8"), cache, calibration_dir=str(sources[source.key]), log=print
        )
        variants["int8 (OpenVINO, NNCF)"] = batched(get_feature_model(int8, "openvino", cache), pixels)
        quantize_s = time.monotonic() - started
        if "BF16" in cpu_capabilities():
            variants["bf16 (OpenVINO)"] = batched(
                get_feature_model(replace(spec, precision="bf16"), "openvino", cache), pixels
            )
        variants["bf16 emulated (Keras mixed_bfloat16)"] = emulated_bf16(spec, pixels)
        rows = {
            "float32 (OpenVINO)": {
                "relative_error": 0.0,
                "nn_agreement": 1.0,
                **{name: test_accuracy(exact, labels, *m) for name, m in masks.items()},
            }
        }
        train, test = masks["half labelled (50/50)"]
        for name, features in variants.items():
            relative = np.linalg.norm(features - exact, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-12)
            rows[name] = {
                "relative_error": float(np.median(relative)),
                "nn_agreement": nearest_neighbour_agreement(exact, features, train, test),
                **{split: test_accuracy(features, labels, *m) for split, m in masks.items()},
            }
        results["bases"][source.description] = {"rows": rows, "int8_quantize_s": round(quantize_s, 1)}
        for name, row in rows.items():
            print(
                f"{source.description:>26} | {name:<38} | "
                + " | ".join(f"{key} {value:.4g}" for key, value in row.items()),
                flush=True,
            )
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
