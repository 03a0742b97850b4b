"""Each numeric bound is declared once (`bottleneck.bounds`): the library refuses exactly what the command's flag
refuses, in one line naming the flag (the flags' side is tests/test_hostile_values.py)."""

from __future__ import annotations

import argparse
import math

import pytest

from bottleneck import bounds
from bottleneck.backbones.spec import BackboneSpec
from bottleneck.cli import build_parser
from bottleneck.cli.common import Bounded, OrAuto
from bottleneck.errors import BottleneckError
from bottleneck.features.augment import compute_views
from bottleneck.features.extract import ExtractOptions
from bottleneck.learn.finetune import FineTuneConfig
from bottleneck.learn.pretrain import PretrainConfig
from bottleneck.learn.splits import SplitConfig
from bottleneck.use.predict import predict_images

#: (declaration, flag, what the library builds from one value of it): each library check of a declared bound.
LIBRARY = [
    (bounds.WORKERS, "--workers", lambda v: ExtractOptions(workers=v)),
    (bounds.MAX_PIXELS, "--max-pixels", lambda v: ExtractOptions(max_pixels=v)),
    (bounds.SHARD_SIZE, "--shard-size", lambda v: ExtractOptions(engine="ray", shard_size=v)),
    (bounds.GPUS_PER_WORKER, "--gpus-per-worker", lambda v: ExtractOptions(engine="ray", gpus_per_worker=v)),
    (bounds.CALIBRATION_IMAGES, "--calibration-images", lambda v: ExtractOptions(calibration_images=v)),
    (bounds.BATCH_SIZE, "--batch-size", lambda v: ExtractOptions(batch_size=v)),
    (bounds.PRETRAIN_IMAGE_SIZE, "--image-size", lambda v: PretrainConfig(image_size=v, blocks=1)),
    (bounds.BLOCKS, "--blocks", lambda v: PretrainConfig(image_size=512, blocks=v)),
    (bounds.FILTERS, "--filters", lambda v: PretrainConfig(filters=v)),
    (bounds.PRETRAIN_EPOCHS, "--epochs", lambda v: PretrainConfig(epochs=v)),
    (bounds.UNFREEZE, "--unfreeze", lambda v: FineTuneConfig(unfreeze=v)),
    (bounds.LEARNING_RATE, "--learning-rate", lambda v: FineTuneConfig(learning_rate=v)),
    (bounds.EPOCHS, "--epochs", lambda v: FineTuneConfig(epochs=v)),
    (bounds.PATIENCE, "--patience", lambda v: FineTuneConfig(patience=v)),
    (bounds.HEAD_EPOCHS, "--head-epochs", lambda v: FineTuneConfig(head_epochs=v)),
    (bounds.LOWER_RATE_FACTOR, "--lower-rate-factor", lambda v: FineTuneConfig(lower_rate_factor=v)),
    (bounds.WARMUP, "--warmup", lambda v: FineTuneConfig(warmup=v)),
    (bounds.WEIGHT_DECAY, "--weight-decay", lambda v: FineTuneConfig(weight_decay=v)),
    (bounds.LABEL_SMOOTHING, "--label-smoothing", lambda v: FineTuneConfig(label_smoothing=v)),
    (bounds.PERCENT, "--val-pct and --test-pct", lambda v: SplitConfig(val_pct=v, test_pct=0)),
    (bounds.TOP, "--top", lambda v: predict_images("no-such-run", [], top=v)),
]


def _edges(interval: bounds.Interval) -> list[float]:
    """Values at and just past each bound, and the hostile ones."""
    step = 1 if interval.kind is int else 1e-9 * max(1.0, abs(interval.high or 1))
    values = [math.nan, math.inf, -math.inf]
    for bound in (interval.low, interval.high):
        if bound is not None:
            values += [bound - step, bound, bound + step]
    return values


@pytest.mark.parametrize("interval, flag, build", LIBRARY, ids=[f"{i}{flag}" for i, (_, flag, _) in enumerate(LIBRARY)])
def test_the_library_refuses_exactly_what_the_declaration_leaves_out(interval, flag, build):
    for value in _edges(interval):
        if value in interval:
            try:
                build(value)
            except BottleneckError as error:  # a later check (no such run or cache) may refuse it, never its bound
                assert not str(error).startswith(f"{flag} must be"), (value, error)
        else:
            with pytest.raises(BottleneckError) as refused:
                build(value)
            message = str(refused.value)
            said = (f"; got {value}", f"; got {value:g} and 0")  # --val-pct and --test-pct say both
            assert message.startswith(f"{flag} must be ") and message.endswith(said), (value, message)
            assert "\n" not in message


def test_library_messages_say_the_declared_range():
    with pytest.raises(BottleneckError, match=r"^--shard-size must be from 1 to 1000000; got 0$"):
        ExtractOptions(engine="ray", shard_size=0)
    with pytest.raises(BottleneckError, match=r"^--warmup must be at least 0 and at most 0.9; got 1.0$"):
        FineTuneConfig(warmup=1.0)
    with pytest.raises(BottleneckError, match=r"^--blocks must be between 1 and 6 and leave at least 1 pixel; got 4$"):
        PretrainConfig(image_size=8, blocks=4)  # in range, but 8 / 2**4 leaves no pixel
    for views in (0, 65):  # checked before the cache is opened
        with pytest.raises(BottleneckError, match=rf"^--augment must be from 1 to 64 views per image; got {views}$"):
            compute_views([], "no-such-cache", None, None, views)
    with pytest.raises(BottleneckError, match=r"^--image-size must be between 1 and 256 for pixels; got 257$"):
        BackboneSpec(architecture="pixels", image_size=257)


def test_every_flag_type_is_built_from_a_declaration():
    """The CLI's types carry the library's declaration itself, not a copy of its numbers."""
    declared = [value for value in vars(bounds).values() if isinstance(value, bounds.Interval)]
    types = []

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            elif isinstance(action.type, Bounded):
                types.append(action.type)

    walk(build_parser())
    assert len(types) >= 50
    assert all(any(kind.interval is d for d in declared) for kind in types)
    assert {id(d) for d in declared} <= {id(kind.interval) for kind in types} | {
        id(bounds.PIXELS_IMAGE_SIZE),
        id(bounds.FOUNDATION_IMAGE_SIZE),
    }  # backbone-specific: the library's alone
    assert OrAuto(bounds.C).__name__ == "auto or more than 0 and at most 1e+06"
    assert OrAuto(bounds.BATCH_SIZE, auto_last=True).__name__ == "1 to 4096, or auto"


def test_a_model_file_with_a_free_input_size_takes_the_flags_cap_in_the_library_too(tmp_path):
    """The 2048 cap (`bounds.IMAGE_SIZE`) is the library's as well: `bn.extract` with a free-size model refuses
    100000 px in one line instead of being killed by the kernel."""
    import keras

    inputs = keras.Input((None, None, 3))
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="gap")(inputs)).save(tmp_path / "free.keras")
    free = str(tmp_path / "free.keras")
    assert BackboneSpec(architecture=free, layer="gap", image_size=2048).input_size == 2048
    with pytest.raises(
        BottleneckError,
        match=r"^--image-size must be from 1 to 2048 \(larger inputs do not fit in "
        r"memory; .*\); got 100000$",
    ):
        BackboneSpec(architecture=free, layer="gap", image_size=100_000)
