"""The report's runs: each run folder under RUNS read back and checked for shape (`Run`), unreadable ones
skipped with a line, fine-tuned runs placed after their parents."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bottleneck.errors import DataError
from bottleneck.learn.run_folder import CONFIG_FILE, METRICS_FILE, read_run_json, run_path
from bottleneck.text import shown


@dataclass
class Run:
    """One run folder, read back; its texts made printable (see `shown`), its image paths kept as they are."""

    run_id: str
    folder: Path
    config: dict
    metrics: dict
    image_files: list[Path] = field(default_factory=list)  # the misclassified test images, in `metrics` order

    @property
    def multi_label(self) -> bool:
        return bool(self.metrics.get("thresholds"))

    def accuracy(self, split: str) -> float | None:
        """The split's accuracy; a multi-label run's mean average precision (it has no accuracy of one label)."""
        found = self.metrics["splits"].get(split)
        return found["mean_average_precision" if self.multi_label else "accuracy"] if found else None

    def settings(self) -> str:
        params = self.metrics.get("params") or {}
        return ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if not k.endswith("_grid")) or "defaults"


def _displayable(value):
    """A copy of JSON data whose every string (keys too) is `shown`."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {shown(k): _displayable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_displayable(v) for v in value]
    return value


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number"
    )


def _shape_problem(config, metrics) -> str | None:
    """What makes this config.json / metrics.json pair unlike what train-head writes, or None."""
    for name, value in (("config.json", config), ("metrics.json", metrics)):
        if not isinstance(value, dict):
            return f"its {name} holds {_json_kind(value)}, not an object"
    if not isinstance(metrics.get("head"), str):
        return "its metrics.json names no head"
    splits = metrics.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(v, dict) or v is None for v in splits.values()):
        return "its metrics.json has no splits"
    return None


def _read_run(folder: Path) -> Run:
    """One run folder; a `DataError` saying why when it cannot be read or is not a run's."""
    config, metrics = (read_run_json(folder / name) for name in (CONFIG_FILE, METRICS_FILE))
    problem = _shape_problem(config, metrics)
    if problem:
        raise DataError(problem)
    wrong = metrics.get("misclassified") or []
    data_root = run_path(folder, config, "data") or Path(".")
    files = [
        data_root / row["path"] if isinstance(row, dict) and isinstance(row.get("path"), str) else Path("")
        for row in (wrong if isinstance(wrong, list) else [])
    ]
    return Run(shown(folder.name), folder, _displayable(config), _displayable(metrics), files)


def _skipped(folder: Path, why: str) -> str:
    return (
        f"warning: skipped run {shown(folder)}: {why}; the report shows the other runs (train that run again, "
        "or move its folder out of the runs folder)"
    )


def load_runs(runs_dir: str | os.PathLike, log: Callable[[str], None] = lambda message: None) -> list[Run]:
    """Every finished run under `runs_dir`, oldest first; one that cannot be read is skipped with a line to `log`."""
    root = Path(runs_dir)
    runs, skipped = [], 0
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        metrics_file, config_file = folder / METRICS_FILE, folder / CONFIG_FILE
        if folder.name.startswith(".") or not metrics_file.is_file() or not config_file.is_file():
            continue
        try:
            runs.append(_read_run(folder))
        except DataError as exc:
            log(_skipped(folder, str(exc)))
            skipped += 1
    if not runs and skipped:
        raise DataError(
            f"none of the {skipped} runs in {shown(root)} can be read (each named above): train one with "
            f"`bottleneck train-head --data DATA --runs {shown(root)}`"
        )
    if not runs:
        raise DataError(
            f"no runs in {shown(root)}: train one with `bottleneck train-head --data DATA --runs {shown(root)}`"
        )
    return beside_parents(runs)


def beside_parents(runs: list[Run]) -> list[Run]:
    """Oldest first, each fine-tuned run right after the run it started from."""
    children: dict[str, list[Run]] = {}
    ids = {run.run_id for run in runs}

    def parent_of(run: Run) -> str | None:
        parent = run.config.get("parent_run")
        return parent if isinstance(parent, str) and parent in ids else None

    for run in runs:
        parent = parent_of(run)
        if parent:
            children.setdefault(parent, []).append(run)
    ordered: list[Run] = []

    def visit(run: Run) -> None:
        ordered.append(run)
        for child in children.get(run.run_id, []):
            visit(child)

    for run in runs:
        if not parent_of(run):
            visit(run)
    seen = {id(run) for run in ordered}
    return ordered + [run for run in runs if id(run) not in seen]  # parents in a loop (hand-edited configs)
