"""Hostile values for every numeric flag (found by walking the parsers, so a new flag is covered without new
code; which values are in range is read from the flag's declaration in `bottleneck.bounds`), and hostile split
files and class layouts: one clear line, exit 2, never a traceback, no work started."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from bottleneck import bounds
from bottleneck.bounds import MAX_MEMORY_BYTES, Interval
from bottleneck.cli import build_parser, main

from .conftest import make_dataset

HOSTILE = ("nan", "inf", "-inf", "NaN", "-1", "0", "1e400", "99999999999999999999", "abc", "", "1.5", "0x10")

#: Flags typed as text but meaning a number, parsed by their command before any work.
TEXT_NUMBERS = {
    ("train-head", "--max-memory"),
    ("audit", "--max-memory"),
    ("dump", "--max-memory"),
    ("fine-tune", "--max-memory"),
}
NUMBER_METAVARS = {"N", "SECONDS", "SIZE", "BYTES", "PIXELS"}


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, parser) for every leaf command, `cache info`, `cache compact` and `cache gc` included."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield prefix, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*prefix, name))


def _minimal_args(parser: argparse.ArgumentParser, skip: argparse.Action) -> list[str]:
    """Dummy values for the required arguments, so the only thing wrong is the flag under test."""
    argv = []
    for action in parser._actions:
        if action is skip or isinstance(action, argparse._SubParsersAction):
            continue
        if not action.option_strings and action.nargs not in ("*", "?"):
            argv.append("x")
        elif action.option_strings and action.required:
            argv += [action.option_strings[0], "x"]
    return argv


def _numeric_flags():
    for prefix, parser in _commands(build_parser()):
        for action in parser._actions:
            if action.option_strings and (action.type in (int, float) or getattr(action.type, "numeric", False)):
                yield pytest.param(prefix, action.option_strings[0], id=" ".join([*prefix, action.option_strings[0]]))


def _find(prefix, flag):
    for found_prefix, parser in _commands(build_parser()):
        if found_prefix == prefix:
            return parser, next(a for a in parser._actions if flag in a.option_strings)
    raise AssertionError(prefix)


def test_the_walk_finds_every_command_and_the_known_numeric_flags():
    found = {(" ".join(p), f) for p, f in (param.values for param in _numeric_flags())}
    commands = {" ".join(p) for p, _ in _commands(build_parser())}
    assert {
        "features",
        "train-head",
        "fine-tune",
        "predict",
        "export",
        "dump",
        "report",
        "audit",
        "pretrain",
        "compare",
        "cache info",
        "cache compact",
        "cache gc",
        "backbones",
        "demo",
    } == commands
    assert {
        ("train-head", "--C"),
        ("train-head", "--seed"),
        ("train-head", "--folds"),
        ("train-head", "--dropout"),
        ("train-head", "--learning-rate"),
        ("features", "--lock-timeout"),
        ("cache compact", "--lock-timeout"),
        ("features", "--batch-size"),
        ("features", "--image-size"),
        ("features", "--gpus-per-worker"),
        ("predict", "--top"),
        ("compare", "--permutations"),
        ("pretrain", "--epochs"),
        ("demo", "--labelled"),
    } <= found


def test_every_numeric_flag_is_bounded_and_its_help_says_the_bounds():
    for prefix, parser in _commands(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            flag = " ".join([*prefix, *action.option_strings[:1]])
            assert action.type not in (int, float), (
                f"{flag} takes any {action.type.__name__}: declare its bounds in bottleneck.bounds, type=Bounded(...)"
            )
            if action.type is not None and action.type is not str:
                assert getattr(action.type, "numeric", False), f"{flag}: an unmarked type {action.type!r}"
                assert any(action.type.interval is declared for declared in DECLARED.values()), (
                    f"{flag}: its bounds are not one of bottleneck.bounds' declarations"
                )
                assert action.type.__name__ in text, f"{flag}: the help does not say {action.type.__name__!r}"
            elif action.option_strings and action.metavar in NUMBER_METAVARS:
                assert (" ".join(prefix), action.option_strings[0]) in TEXT_NUMBERS, (
                    f"{flag} looks numeric, has no type"
                )


@pytest.mark.parametrize("prefix, flag", list(_numeric_flags()))
def test_hostile_values_are_refused_by_the_flag_before_any_work(prefix, flag, capsys):
    """SystemExit comes from argparse, for every value outside the flag's declaration: a command that started
    would return its code instead."""
    parser, action = _find(prefix, flag)
    refused = 0
    for value in HOSTILE:
        if _inside(action.type.interval, value):
            continue  # e.g. --epochs 0 for pretrain saves the untrained network; --gpus-per-worker 1.5 is fine
        with pytest.raises(SystemExit) as caught:  # argparse: usage, then the one error line
            main([*prefix, *_minimal_args(parser, action), f"{flag}={value}"])
        err = capsys.readouterr().err
        assert caught.value.code == 2, (flag, value)
        last = err.strip().splitlines()[-1]
        assert re.match(rf"^bottleneck( \S+)*: error: argument {re.escape(flag)}: expected ", last), (value, last)
        assert "Traceback" not in err
        refused += 1
    assert refused >= 8


#: Every declaration in `bottleneck.bounds`, by name.
DECLARED = {name: value for name, value in vars(bounds).items() if isinstance(value, Interval)}


def _inside(interval: Interval, text: str) -> bool:
    """Whether `text`, read as the declaration's kind of number (a whole number: int()), is within its bounds."""
    try:
        value = interval.kind(text)
    except ValueError:
        return False
    return value in interval


def test_the_bounds_read_well(capsys):
    with pytest.raises(SystemExit):
        main(["features", "data", "--backbone", "model.keras", "--layer", "x", "--image-size", "100000"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bottleneck features: error: argument --image-size: expected a whole number from 1 to 2048, got '100000' "
        "(larger inputs do not fit in memory; `bottleneck backbones` lists each backbone's default and minimum)"
    )
    with pytest.raises(SystemExit):
        main(["train-head", "--data", "x", "--learning-rate", "nan"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bottleneck train-head: error: argument --learning-rate: expected a finite number (more than 0 and at most 10), "
        "got 'nan'"
    )
    with pytest.raises(SystemExit):
        main(["cache", "compact", "--lock-timeout", "-5"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bottleneck cache compact: error: argument --lock-timeout: expected a number at least 0 and at most 1e+07, "
        "got '-5' (seconds; leave the flag out to wait as long as it takes)"
    )


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1e400", "--max-memory '1e400' is more than 1P (1 PiB)"),
        ("99999999999999999999", "--max-memory '99999999999999999999' is more than 1P"),
        ("nan", "--max-memory 'nan' is not a size"),
        ("-1", "--max-memory '-1' is not a size"),
        ("inf", "--max-memory 'inf' is not a size"),
        ("0", "--max-memory must be more than 0 bytes"),
        ("abc", "--max-memory 'abc' is not a size"),
    ],
)
@pytest.mark.parametrize("command", ["train-head", "audit", "dump", "fine-tune"])
def test_max_memory_hostile_sizes_are_one_line(command, value, expected, tmp_path, capsys):
    where = {
        "train-head": ["--runs", str(tmp_path / "runs")],
        "audit": ["--out", str(tmp_path / "runs")],
        "dump": ["--out", str(tmp_path / "runs" / "f.parquet")],
        "fine-tune": ["--runs", str(tmp_path / "runs")],
    }[command]
    source = "--run" if command == "fine-tune" else "--data"
    assert main([command, source, str(tmp_path / "nothing"), *where, "--max-memory", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bottleneck: error: {expected}") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before any work
    assert MAX_MEMORY_BYTES == 2**50


# Split files and classes, on features of the `pixels` backbone at 8x8.


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data, cache = root / "data", root / "cache"
    make_dataset(data, per_class=6, classes={"red": (200, 40, 40), "blue": (30, 60, 200)})
    assert (
        main(
            ["features", str(data), "--cache", str(cache), "--backbone", "pixels", "--image-size", "8", "--no-progress"]
        )
        == 0
    )
    return data, cache


def _train(extracted, tmp_path, *extra) -> tuple[int, str]:
    data, cache = extracted
    return main(
        [
            "train-head",
            "--data",
            str(data),
            "--cache",
            str(cache),
            "--runs",
            str(tmp_path / "runs"),
            "--val-pct",
            "20",
            "--test-pct",
            "20",
            *extra,
        ]
    ), str(tmp_path / "runs")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("bottleneck: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _no_run_written(runs: str) -> bool:
    return not Path(runs).exists() or not any(p for p in Path(runs).iterdir() if not p.name.startswith("."))


def _split_file(tmp_path, extracted, edit) -> Path:
    data, _ = extracted
    rows = [
        f"{p.parent.name}/{p.name},{p.parent.name},{'train' if i % 3 else 'test'}"
        for i, p in enumerate(sorted(data.glob("*/*.png")))
    ]
    path = tmp_path / "split.csv"
    path.write_text("\n".join(["path,label,split", *edit(rows)]) + "\n")
    return path


def test_split_file_with_a_short_row_names_file_and_line(extracted, tmp_path, capsys):
    split = _split_file(tmp_path, extracted, lambda rows: [*rows[:3], rows[3].rsplit(",", 1)[0], *rows[4:]])
    code, runs = _train(extracted, tmp_path, "--split-file", str(split))
    assert code == 2 and _no_run_written(runs)
    assert _one_line(capsys) == (
        f"bottleneck: error: split file {split}, line 5: 2 of the 3 columns path,label,split; "
        "complete or delete that row"
    )


def test_split_file_with_unknown_split_names_the_first_line(extracted, tmp_path, capsys):
    split = _split_file(
        tmp_path,
        extracted,
        lambda rows: [*rows[:2], rows[2].rsplit(",", 1)[0] + ",holdout", rows[3].rsplit(",", 1)[0] + ",", *rows[4:]],
    )
    code, runs = _train(extracted, tmp_path, "--split-file", str(split))
    assert code == 2 and _no_run_written(runs)
    assert _one_line(capsys) == (
        f"bottleneck: error: split file {split} has unknown split names: holdout, '' "
        "(first on line 4; use train, validation, test)"
    )


def test_split_file_listing_a_path_twice_differently_is_refused(extracted, tmp_path, capsys):
    split = _split_file(tmp_path, extracted, lambda rows: [*rows, rows[1].rsplit(",", 1)[0] + ",validation"])
    code, _ = _train(extracted, tmp_path, "--split-file", str(split))
    assert code == 2
    assert re.fullmatch(
        rf"bottleneck: error: split file {re.escape(str(split))}, line 14: 'blue/blue_001.png' again, "
        r"with another label or split than on line 3; keep one of the two rows",
        _one_line(capsys),
    )


def test_split_file_label_contradicting_the_folders_is_refused(extracted, tmp_path, capsys):
    def relabel(rows):
        return [
            row.replace(",red,", ",blue,") if row.startswith("red/") and i % 2 else row for i, row in enumerate(rows)
        ]

    split = _split_file(tmp_path, extracted, relabel)
    code, runs = _train(extracted, tmp_path, "--split-file", str(split))
    assert code == 2 and _no_run_written(runs)
    assert _one_line(capsys) == (
        f"bottleneck: error: split file {split} labels 3 images other than their class folders do, first "
        "red/red_001.png ('blue', folder 'red'); labels come from the folders: move the images or fix the label column"
    )
    good = _split_file(tmp_path, extracted, lambda rows: rows)
    assert _train(extracted, tmp_path, "--split-file", str(good))[0] == 0  # the same file, labels right: trained


@pytest.mark.slow
def test_more_folds_than_the_smallest_class_is_refused_before_training(extracted, tmp_path, capsys):
    code, runs = _train(extracted, tmp_path, "--folds", "9")
    assert code == 2 and _no_run_written(runs)
    assert re.fullmatch(
        r"bottleneck: error: --folds 9 is more than class '\w+' can fill: it has \d training and "
        r"validation images \(near-duplicates named _nohash_ count once\); use --folds \d or fewer, or "
        r"give that class more images",
        _one_line(capsys),
    )
    assert _train(extracted, tmp_path, "--folds", "2")[0] == 0


def test_val_and_test_leaving_no_training_images_is_one_line(extracted, tmp_path, capsys):
    code, runs = _train(extracted, tmp_path, "--val-pct", "60", "--test-pct", "40")
    assert code == 2 and _no_run_written(runs)
    assert "leave some training images; got 60 and 40" in _one_line(capsys)


def test_only_one_class_with_usable_images_is_one_line(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data, per_class=4, classes={"red": (200, 40, 40)})
    (data / "blue").mkdir()
    for i in range(3):
        (data / "blue" / f"broken_{i}.png").write_bytes(b"not an image")
    assert (
        main(
            ["features", str(data), "--cache", str(cache), "--backbone", "pixels", "--image-size", "8", "--no-progress"]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["train-head", "--data", str(data), "--cache", str(cache), "--runs", str(tmp_path / "runs")]) == 2
    assert _one_line(capsys) == (
        "bottleneck: error: only class 'red' has images with features; the images of 1 other class ('blue') were left "
        "out: failed extraction 3; a head needs at least 2 classes: fix or remove the failed images and run "
        "`bottleneck features` again"
    )
    assert _no_run_written(str(tmp_path / "runs"))
