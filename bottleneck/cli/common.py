"""What every command shares: one-line errors, argument types, the backbone flags."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from bottleneck import bounds
from bottleneck.bounds import Interval
from bottleneck.text import one_line

EXIT_USAGE = 2


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line_each(write: Callable[[str], None]) -> Callable[[str], None]:
    """`write` with control characters escaped, for summaries that quote file names (a name may hold a newline);
    not for `stderr` itself, which also prints multi-line tables."""
    return lambda line: write(one_line(line))


class Bounded:
    """An argparse `type=` built from a declared `bounds.Interval`: refuses words, nan, infinities and values out of
    range, in argparse's one line naming the flag.

    `numeric = True` marks it for the test that feeds every numeric flag hostile values (which reads `interval`);
    `__name__` is the range in words, so a flag's help says it with `%(type)s`.
    """

    numeric = True

    def __init__(self, interval: Interval) -> None:
        self.interval = interval
        self.kind = interval.kind
        self.__name__ = interval.words

    def __call__(self, text: str):
        what = "a whole number" if self.kind is int else "a number"
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what} ({self.__name__}), got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number ({self.__name__}), got {text!r}")
        if value not in self.interval:
            scope = f"from {self.__name__}" if self.kind is int else self.__name__
            note = self.interval.note
            raise argparse.ArgumentTypeError(f"expected {what} {scope}, got {text!r}" + (f" ({note})" if note else ""))
        return value

    def __repr__(self) -> str:
        return f"<{self.kind.__name__} {self.__name__}>"


class OrAuto(Bounded):
    """A `Bounded` number, or the word `auto` (returned as the string 'auto'): `--C`'s 'auto or <range>' (a bad
    value is refused as `Bounded` refuses it), or, with `auto_last`, '<range>, or auto' (one message for any bad
    value: `--batch-size`, fine-tune's `--learning-rate`)."""

    def __init__(self, interval: Interval, auto_last: bool = False) -> None:
        super().__init__(interval)
        self.auto_last = auto_last
        self.__name__ = f"{self.__name__}, or auto" if auto_last else f"auto or {self.__name__}"

    def __call__(self, text: str):
        if text.strip().lower() == "auto":
            return "auto"
        if not self.auto_last:
            return super().__call__(text)
        try:
            return super().__call__(text)
        except argparse.ArgumentTypeError:
            what = "a whole number from" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} {self.__name__}, got {text!r}") from None


#: The most `--max-memory` may say (declared in `bounds`).
MAX_MEMORY_LIMIT = bounds.MAX_MEMORY_BYTES


def memory_budget(text: str | None) -> int | None:
    """`--max-memory` in bytes ('512M', '2G', '1.5GB' or bytes, by `learn.memory.parse_size`), at most 1 PiB.

    Parsed in the command (not by argparse) so a bad size is one line, `bottleneck: error: --max-memory ...`.
    """
    from bottleneck.learn.memory import MemoryBudgetError, parse_size

    if text is None:
        return None
    try:
        size = parse_size(text)
    except (OverflowError, ValueError):  # '1e400': a float infinity
        size = MAX_MEMORY_LIMIT + 1
    if size > MAX_MEMORY_LIMIT:
        raise MemoryBudgetError(
            f"--max-memory {text!r} is more than 1P (1 PiB); give a size such as 512M or 2G, "
            "or leave the flag out for a quarter of the available memory"
        )
    return size


#: Flags shared by several commands (their bounds are declared in `bottleneck.bounds`).
BATCH_SIZE = Bounded(bounds.BATCH_SIZE)
#: `--batch-size` of commands that run the backbone: a whole number, or 'auto' (chosen for the device).
BATCH_SIZE_OR_AUTO = OrAuto(bounds.BATCH_SIZE, auto_last=True)
WORKERS = Bounded(bounds.WORKERS)
EPOCHS = Bounded(bounds.EPOCHS)
PATIENCE = Bounded(bounds.PATIENCE)
SEED = Bounded(bounds.SEED)
LEARNING_RATE = Bounded(bounds.LEARNING_RATE)
LOCK_TIMEOUT = Bounded(bounds.LOCK_TIMEOUT)
IMAGE_SIZE = Bounded(bounds.IMAGE_SIZE)
#: --val-pct and --test-pct.
PERCENT = Bounded(bounds.PERCENT)


def add_split_arguments(parser: argparse.ArgumentParser, title: str):
    """`--seed`, `--val-pct`, `--test-pct`, `--split-file` of a command that reads train-head's split; the group."""
    split = parser.add_argument_group(title)
    split.add_argument("--seed", type=SEED, default=0, help="seed of the split, %(type)s (default: 0)")
    split.add_argument("--val-pct", type=PERCENT, default=10.0, help="validation percentage, %(type)s (default: 10)")
    split.add_argument("--test-pct", type=PERCENT, default=10.0, help="test percentage, %(type)s (default: 10)")
    split.add_argument("--split-file", default=None, help="a saved split.csv (a run's) instead of drawing one")
    return split


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """`--layout` (how DATA is laid out: class folders, or split folders of class folders) and `--labels FILE`."""
    from bottleneck.features.discover import LAYOUTS

    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="DATA/<class>/... (classes), DATA/{train,val,test}/<class>/... (split-folders: the "
        "folders are the splits) or images without labels (plain); auto tells them apart and asks "
        "when it cannot (default: auto)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        metavar="FILE",
        help="a CSV, TSV or Parquet file with columns path,label (and optionally split, group) naming "
        "the images and their labels, paths relative to the file's folder or absolute; DATA may then "
        "be left out",
    )
    parser.add_argument(
        "--image-column",
        default=None,
        metavar="NAME",
        help="Parquet DATA: the column of image bytes (default: the one column of bytes, or of {bytes, path} structs)",
    )
    parser.add_argument(
        "--label-column",
        default=None,
        metavar="NAME",
        help="Parquet DATA: the column of labels (default: label, when there is one)",
    )


def columns_of(args: argparse.Namespace):
    """The Parquet columns `--image-column` and `--label-column` name (a `shards.Columns`), or None for neither."""
    from bottleneck.features.shards import Columns

    if args.image_column is None and args.label_column is None:
        return None
    return Columns(args.image_column, args.label_column)


def data_or_labels(args: argparse.Namespace) -> None:
    """One line when neither DATA nor --labels says where the images are."""
    from bottleneck.errors import DataError

    if args.data is None and args.labels is None:
        raise DataError("give DATA (a folder of images) or --labels FILE (a label file naming them)")


def add_backbone_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """The flags that pick a backbone, shared by every command that reads or writes a store.

    With `optional`, leaving them all out means "the only store in the cache".
    """
    group = parser.add_argument_group("backbone" + (" (default: the only store in the cache)" if optional else ""))
    group.add_argument(
        "--backbone",
        default=None if optional else "inception_v3",
        help="a Keras application (inception_v3, resnet50, efficientnet_b0, ...: `bottleneck backbones` "
        "lists them), a foundation model from KerasHub (dinov2_small, clip_vit_b16, siglip2_b16, vit_b16, ...), pixels "
        "(the raw image: a no-transfer baseline), or a .keras model file (default: inception_v3)",
    )
    group.add_argument(
        "--layer",
        default=None,
        help="with a .keras model file: the layer to extract (spatial layers are average-pooled)",
    )
    group.add_argument(
        "--preprocess",
        default=None,
        choices=["none", "unit", "inception"],
        help="with a .keras model file: none (the model rescales itself; default), unit (x/255), inception (x/127.5-1)",
    )
    group.add_argument(
        "--weights",
        default=None if optional else "imagenet",
        help="'imagenet' (Keras downloads them once), 'none' (random, for tests), or a path to a "
        "no-top Keras weights file (.h5 or .weights.h5) (default: imagenet); foundation models: 'hub' (KerasHub "
        "downloads the preset once; the default), 'none', or a local preset folder (config.json + model.weights.h5)",
    )
    group.add_argument(
        "--image-size",
        type=IMAGE_SIZE,
        default=None,
        metavar="N",
        help="square input size in pixels, %(type)s (default: the backbone's own, e.g. 299 for inception_v3; "
        "`bottleneck backbones` lists each one's default and minimum)",
    )
    group.add_argument(
        "--pooling",
        choices=["cls", "mean", "pooled"],
        default=None,
        help="foundation models (dinov2_*, clip_*, siglip2_*, vit_*): cls (the class token; the default "
        "where there is one), mean (of the patch tokens) or pooled (SigLIP's own head); a store of its own",
    )
    group.add_argument(
        "--precision",
        choices=["float32", "mixed", "bf16", "int8"],
        default=None,
        help="float32 (default: exact float32 arithmetic on every CPU and GPU); mixed: float16 compute "
        "on a GPU; bf16: bfloat16 on CPUs that have it (AVX512_BF16, AMX), about twice as fast; int8: "
        "the network quantized by NNCF on calibration images, fastest on CPUs with VNNI. bf16 and int8 "
        "run on OpenVINO. Each changes the features slightly, so each is a store of its own",
    )


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick what runs the backbone, for commands that compute features."""
    group = parser.add_argument_group("backend")
    group.add_argument(
        "--backend",
        choices=["tensorflow", "jax", "torch"],
        default=None,
        help="the Keras backend that runs the backbone: the same weights give the same features on each, "
        "so they share one cache (default: $KERAS_BACKEND, else tensorflow; jax: pip install "
        "'bottleneck-transfer[jax]', torch: 'bottleneck-transfer[torch]')",
    )
    group.add_argument(
        "--runtime",
        choices=["auto", "keras", "openvino"],
        default="auto",
        help="auto (default): OpenVINO on a CPU where it is installed (the same features, faster), Keras "
        "on a GPU or with --backend jax/torch; keras: the Keras network on --backend; openvino: "
        "converted once per backbone into the cache (pip install "
        "'bottleneck-transfer[openvino]')",
    )


def spec_from(args: argparse.Namespace):
    """The backbone the flags name (None when none is given); int8 takes the cache's calibration if it has one."""
    from bottleneck.backbones.quantize import with_default_calibration
    from bottleneck.backbones.spec import BackboneSpec

    if all(
        getattr(args, name, None) is None
        for name in ("backbone", "weights", "image_size", "layer", "preprocess", "precision", "pooling")
    ):
        return None
    spec = BackboneSpec(
        architecture=args.backbone or "inception_v3",
        weights=args.weights or "imagenet",
        image_size=args.image_size,
        layer=args.layer,
        preprocess=args.preprocess,
        precision=args.precision or "float32",
        pooling=getattr(args, "pooling", None) or "avg",
    )
    cache = getattr(args, "cache", None)
    return with_default_calibration(spec, cache) if cache and spec.precision == "int8" else spec


def select_backend(args: argparse.Namespace, spec=None) -> None:
    """Make `--backend` this process's Keras backend, before anything imports Keras; check `--precision`.

    A backend that is not installed, or `--precision mixed` where the backend sees no GPU, is one line.
    """
    from bottleneck.backbones.backend import check_precision, use_backend

    backend = use_backend(getattr(args, "backend", None))
    if spec is not None and spec.precision != "float32" and spec.kind != "pixels":
        check_precision(spec.precision, backend)


def print_split_scores(metrics: dict, out) -> None:
    """One line per split of a run's metrics: accuracy, macro F1, log loss, images (multi-label: mean average
    precision, micro and macro F1, exact match)."""
    for name, scores in metrics["splits"].items():
        if scores and scores.get("multi_label"):
            found = scores["mean_average_precision"]
            out(
                f"  {name:<10} mAP {'-' if found is None else f'{found:.4f}'}  micro F1 {scores['micro_f1']:.4f}  "
                f"macro F1 {scores['macro_f1']:.4f}  exact match {scores['exact_match']:.4f}  ({scores['images']} images)"
            )
        elif scores:
            ci = scores.get("accuracy_ci")  # the 95% bootstrap interval over this split's images
            out(
                f"  {name:<10} accuracy {scores['accuracy']:.4f}"
                + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                + f"  macro F1 {scores['macro_f1']:.4f}  log loss {scores['log_loss']:.4f}  ({scores['images']} images)"
            )
