"""Progress of Keras training (the keras head, `pretrain`) on stderr: a tqdm bar on a terminal (the house style of
`features`), else a line per epoch, at most one every few seconds (and the last), for logs: epoch, loss, validation
accuracy and the ETA if every remaining epoch runs (early stopping may end sooner)."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _scores(logs: dict) -> dict[str, str]:
    shown = {"loss": logs.get("loss"), "val_loss": logs.get("val_loss"), "val_acc": logs.get("val_accuracy")}
    return {k: f"{v:.4f}" for k, v in shown.items() if v is not None}


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def epoch_callback(
    desc: str,
    epochs: int,
    enabled: bool,
    tty: bool | None = None,
    write: Callable[[str], None] = _stderr,
    every: float = 5.0,
):
    """A Keras callback that shows training's progress per epoch; None when not `enabled`.

    `tty` (default: whether stderr is a terminal) picks the bar; otherwise lines, `every` seconds apart at most.
    """
    if not enabled or epochs <= 0:
        return None
    from bottleneck.backbones.backend import import_keras

    keras = import_keras()
    terminal = sys.stderr.isatty() if tty is None else tty

    Callback: Any = keras.callbacks.Callback  # a base class that exists once Keras is loaded

    class EpochProgress(Callback):
        def on_train_begin(self, logs=None):
            self.started = self.last = time.perf_counter()
            self.bar = None
            if terminal:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=epochs, unit="epoch", desc=desc, dynamic_ncols=True, file=sys.stderr)

        def on_epoch_end(self, epoch, logs=None):
            self.done = epoch + 1
            scores = _scores(logs or {})
            if self.bar is not None:
                self.bar.set_postfix(scores, refresh=False)
                self.bar.update(1)
                return
            now = time.perf_counter()
            done = epoch + 1
            if now - self.last < every and done < epochs and epoch > 0:
                return
            self.last = now
            eta = (now - self.started) / done * (epochs - done)
            write(
                f"{desc}: epoch {done}/{epochs}  "
                + "  ".join(f"{k} {v}" for k, v in scores.items())
                + f"  ETA {_eta(eta)} (if no early stop)"
            )

        def on_train_end(self, logs=None):
            if self.bar is not None:
                self.bar.close()
            else:
                write(f"{desc}: {getattr(self, 'done', 0)} epochs in {_eta(time.perf_counter() - self.started)}")

    return EpochProgress()
