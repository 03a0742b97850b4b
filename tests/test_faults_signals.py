"""Signals and forked workers: a library's worker pool never inherits our KeyboardInterrupt on SIGTERM."""
from __future__ import annotations

import os
import signal

import numpy as np


def test_a_forked_child_gets_the_default_signal_handlers_back():
    from bottleneck.cli import _catch_interrupts, _interrupt, _restore

    previous = _catch_interrupts()
    try:
        assert signal.getsignal(signal.SIGTERM) is _interrupt
        child = os.fork()
        if child == 0:  # the child: what a multiprocessing pool worker would start with
            ok = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
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
