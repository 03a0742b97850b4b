"""Facts about a user's `.keras` model file, read from its JSON config without loading TensorFlow.

A `.keras` file is a zip holding `config.json`; reading it directly gives the input size and the
layer names at once, so a wrong path or layer name is a one-line error before anything heavy runs.
"""

from __future__ import annotations

import difflib
import json
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bottleneck.errors import BackboneError


@dataclass(frozen=True)
class KerasFileInfo:
    """The input shape and layer names declared by a `.keras` file."""

    path: Path
    input_shape: tuple  # (height, width, channels); None where not fixed
    layer_names: tuple[str, ...]

    def check_layer(self, name: str) -> None:
        """Raise a `BackboneError` naming the closest layers when `name` is not one of them."""
        if name in self.layer_names:
            return
        close = difflib.get_close_matches(name, self.layer_names, n=5, cutoff=0.3) or list(self.layer_names[-5:])
        raise BackboneError(f"layer {name!r} is not in {self.path}; nearest names: {', '.join(close)}")


def _layers(config: dict) -> list[dict]:
    inner = config.get("config", {})
    return inner.get("layers", []) if isinstance(inner, dict) else []


def read_keras_file(path: str | Path) -> KerasFileInfo:
    """Read a `.keras` model file's config; raise a one-line `BackboneError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"model file not found: {path}")
    stat = path.stat()
    return _read_unchanged(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _read_unchanged(path: Path, size: int, mtime_ns: int) -> KerasFileInfo:
    # A spec asks for its input size and layers many times; the file is parsed once while unchanged.
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        raise BackboneError(f"{path} is not a Keras model file (.keras, as saved by model.save)") from None
    layers = _layers(config)
    if not layers:
        raise BackboneError(f"{path} holds no functional or sequential Keras model with named layers")
    names = tuple(layer.get("config", {}).get("name") or layer.get("name", "") for layer in layers)
    shape: tuple = (None, None, None)
    for layer in layers:
        if layer.get("class_name") == "InputLayer":
            batch_shape = layer.get("config", {}).get("batch_shape") or layer.get("config", {}).get("batch_input_shape")
            if batch_shape and len(batch_shape) == 4:
                shape = tuple(batch_shape[1:])
            break
    return KerasFileInfo(path=path, input_shape=shape, layer_names=names)
