"""Signals and forked workers: a library's worker pool never inherits our KeyboardInterrupt on SIGTERM."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest


def test_a_forked_child_gets_the_default_signal_handlers_back():
    from bottleneck.cli import _catch_interrupts, _interrupt, _restore

    previous = _catch_interrupts()
    try:
        assert signal.getsignal(signal.SIGTERM) is _interrupt
        child = os.fork()
        if child == 0:  # the child: what a multiprocessing pool worker would start with
            ok = (
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
            )
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert signal.getsignal(signal.SIGTERM) is _interrupt  # the parent keeps its own
    finally:
        _restore(previous)


def test_confident_learning_runs_in_this_process(monkeypatch):
    import cleanlab.filter

    from bottleneck.inspect.audit import label_issue_rows

    seen = {}
    real = cleanlab.filter.find_label_issues

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cleanlab.filter, "find_label_issues", spy)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    proba = rng.dirichlet([1, 1, 1], size=60)
    proba[np.arange(60), y] += 2
    proba /= proba.sum(axis=1, keepdims=True)
    label_issue_rows(y, proba)
    assert seen["n_jobs"] == 1  # no forked pool to inherit a SIGTERM handler or die holding a lock


@pytest.mark.slow
def test_ctrl_c_in_fine_tune_is_one_line_and_no_tensorflow_noise(tmp_path):
    """Mid-epoch, augmentation running: no TensorArray "Object was never used" block, no crash, exit code 130."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from bottleneck.backbones.spec import BackboneSpec
    from bottleneck.features.extract import extract_features
    from bottleneck.learn.pretrain import PretrainConfig, pretrain
    from bottleneck.learn.runs import HeadConfig, train_head

    from .conftest import make_dataset

    data = tmp_path / "data"
    make_dataset(data, per_class=40)
    pretrain(data, tmp_path / "base.keras", PretrainConfig(image_size=32, blocks=2, filters=8, epochs=1))
    spec = BackboneSpec(architecture=str(tmp_path / "base.keras"), layer="features")
    extract_features(data, tmp_path / "cache", spec)
    # C given: the head only has to exist, its cross-validated choice of C is not what this test is about
    run = train_head(data, tmp_path / "cache", tmp_path / "runs", spec, HeadConfig("logreg", C=1.0)).run_dir
    root = Path(__file__).resolve().parent.parent
    for sent in (signal.SIGINT,):  # SIGTERM takes the same handler (test_a_forked_child_... and the CLI tests)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bottleneck",
                "fine-tune",
                "--run",
                str(run),
                "--runs",
                str(tmp_path / sent.name),
                "--epochs",
                "100",
                "--patience",
                "100",
                "--learning-rate",
                "1e-3",
                "--augment",
                "flip,crop,brightness",
            ],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **{
                    k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"
                },  # the CLI's own, not the suite's
                "PYTHONPATH": str(root),
                "PYTHONFAULTHANDLER": "1",
            },
        )
        lines = []
        for line in process.stderr:  # training, with augmentation, is under way once an epoch has ended
            lines.append(line)
            if line.startswith("epoch 1/"):
                break
        time.sleep(0.5)  # into the next epoch: augmenting or training
        process.send_signal(sent)
        rest = process.communicate(timeout=120)[1]
        err = "".join(lines) + rest
        assert process.returncode == 130, err  # a segmentation fault would be -11
        assert "never used" not in err and "ERROR" not in err and "Traceback" not in err and "Fatal" not in err, err
        assert err.strip().splitlines()[-1] == (
            "bottleneck: interrupted; finished epochs are kept, run the same command again to resume"
        )


_POOL_UNDER_SIGTERM = """
import multiprocessing, os, signal, sys, threading, time
from bottleneck.cli import _catch_interrupts

def slow(x):
    time.sleep(0.2)
    return x

_catch_interrupts()
for attempt in range(8):
    pool = multiprocessing.get_context("fork").Pool(2)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        pool.map(slow, range(40))
    except KeyboardInterrupt:
        pass
    pool.terminate()  # SIGTERM to each worker, as cleanlab's pool gets when its parent is interrupted
    pool.join()
print("done")
"""


def test_a_forked_pool_under_sigterm_in_a_loop_ends_quietly():
    """What `audit` did with cleanlab's pool: workers printed KeyboardInterrupt tracebacks, and once it hung."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _POOL_UNDER_SIGTERM],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
