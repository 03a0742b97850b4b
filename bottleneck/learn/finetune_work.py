"""Fine-tune's work folder beside the runs: per-epoch weights, optimizer and state (so Ctrl-C keeps the best
epoch and the same command resumes), the parent it started from, and the lock that runs one at a time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bottleneck import naming
from bottleneck.backbones.build import import_tensorflow
from bottleneck.errors import BottleneckError
from bottleneck.learn.finetune_images import _predict
from bottleneck.learn.run_folder import LoadedRun


class _WorkFolder:
    """Per-epoch state of an unfinished fine-tune: last and best weights, optimizer, history."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.state_file = folder / "state.json"

    def load_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def save(self, model, state: dict, best: bool, optimizer_variables: list) -> None:
        """Write this epoch's files under new names, then the state that names them, then drop older files:
        a run killed at any moment resumes from one consistent epoch."""
        self.folder.mkdir(parents=True, exist_ok=True)
        epoch = state["epoch"]
        names = {
            "last": f"last-{epoch}.weights.h5",
            "optimizer": f"optimizer-{epoch}.npz",
            "best": f"best-{epoch}.weights.h5" if best else state.get("files", {}).get("best"),
        }
        _save_weights_atomically(model, self.folder / names["last"])
        if best:
            _save_weights_atomically(model, self.folder / names["best"])
        tmp = self.folder / ".optimizer.tmp.npz"
        arrays: dict[str, Any] = {f"v{i}": np.asarray(v) for i, v in enumerate(optimizer_variables)}  # see dump.py
        np.savez(tmp, **arrays)
        os.replace(tmp, self.folder / names["optimizer"])
        state["files"] = names
        tmp_state = self.folder / ".state.json.tmp"
        tmp_state.write_text(json.dumps(state))
        os.replace(tmp_state, self.state_file)
        for stale in self.folder.iterdir():
            if stale.name not in set(names.values()) | {self.state_file.name}:
                stale.unlink(missing_ok=True)

    def path(self, state: dict, kind: str) -> Path | None:
        name = state.get("files", {}).get(kind)
        return self.folder / name if name and (self.folder / name).exists() else None

    def restore_optimizer(self, variables: list, state: dict) -> bool:
        """Set the optimizer's variables from the saved epoch; False (it starts afresh) where the file is missing,
        damaged or of another optimizer."""
        path = self.path(state, "optimizer")
        if path is None:
            return False
        try:
            with np.load(path) as saved:
                arrays = [saved[f"v{i}"] for i in range(len(saved.files))]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a damaged file: not a traceback
            return False
        if len(arrays) != len(variables) or any(a.shape != tuple(v.shape) for a, v in zip(arrays, variables)):
            return False
        for array, variable in zip(arrays, variables):
            variable.assign(array)
        return True


def _without_optimizer(model):
    """The same network, uncompiled: a saved optimizer would only make Keras warn when the file is loaded."""
    _, keras = import_tensorflow()
    clean = keras.models.clone_model(model)
    clean.set_weights(model.get_weights())
    return clean


def validation_loss(model, pixels: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the true labels, computed the same way for epoch 0 and every later epoch."""
    proba = np.clip(_predict(model, pixels), 1e-7, 1 - 1e-7)
    return float(-np.mean(np.log(proba[np.arange(len(y)), y])))


def _starting_state(model, pixels: np.ndarray, y: np.ndarray, work: _WorkFolder) -> dict:
    """Epoch 0 is the parent run itself: fine-tuning keeps it when no epoch beats its validation loss."""
    state = {
        "epoch": 0,
        "best_loss": float("inf"),
        "best_epoch": 0,
        "waited": 0,
        "history": {"loss": [], "val_loss": []},
    }
    if len(y):
        state["best_loss"] = validation_loss(model, pixels, y)
        work.folder.mkdir(parents=True, exist_ok=True)
        _save_weights_atomically(model, work.folder / "best-0.weights.h5")
        state["files"] = {"best": "best-0.weights.h5"}
    return state


PARENT_FILES = ("head.npz", "model.keras", "labels.json")  # what a run's head is made of, whichever it has


def parent_identity(run: LoadedRun) -> str:
    """A digest of the parent run's head and backbone: a resumed fine-tune must start from the same ones."""
    digest = hashlib.sha256(f"{run.fingerprint}\n{json.dumps(run.labels)}".encode())
    for name in PARENT_FILES:
        path = run.folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _resumable_state(work: _WorkFolder, parent: str, run_id: str, log: Callable[[str], None]) -> dict | None:
    """The saved state to resume from, or None: none saved, or saved from a parent whose head has changed since."""
    state = work.load_state()
    if state is None or work.path(state, "last") is None:
        return None
    if state.get("parent") != parent:
        log(
            f"warning: the head or backbone of run {run_id} changed since {work.folder} saved epoch {state['epoch']} "
            "(a file of the run was replaced): its epochs belong to the old parent, so fine-tuning starts again"
        )
        return None
    return state


def _save_weights_atomically(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _one_at_a_time(folder: Path, run_id: str):
    """Hold the lock of a fine-tune's work folder; one line if the same fine-tune is running in another process."""
    from bottleneck.fs import exclusive_lock

    def busy(holder: str) -> BottleneckError:
        return BottleneckError(
            f"the same fine-tune of run {run_id} is already running (pid {holder}); wait for it "
            "to finish (its epochs are kept) or change a setting to start another"
        )

    lock = naming.lock_beside(folder)
    with exclusive_lock(lock, timeout=0, busy=busy):
        try:
            yield
        finally:
            if not folder.exists():  # finished: nothing left to resume, so nothing of ours stays in the runs folder
                lock.unlink(missing_ok=True)
