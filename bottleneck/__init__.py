"""bottleneck: transfer learning through a content-keyed feature cache.

The Python API (`import bottleneck as bn`; see `bottleneck.api`): `bn.extract`, `bn.load_features`
(a `FeatureSet` with the split `train-head` draws), `bn.train_head` and `bn.Run`, and the heads
`bn.LogRegHead`, `bn.KerasHead` and `bn.KnnHead` (scikit-learn estimators). They are loaded when first used, so
`import bottleneck` and the command's `--help` stay fast.
"""

import importlib as _importlib
import warnings as _warnings

__version__ = "0.1.0"

# pandas (imported by scikit-learn and Ray Data when installed) looks for the numerical library that is
# also called `bottleneck`, finds this package instead and warns; it then simply does without it.
_warnings.filterwarnings("ignore", message=r"Pandas requires version .* of 'bottleneck'", category=UserWarning)


#: The public API and the module each name lives in.
_API = {
    "extract": "bottleneck.api",
    "load_features": "bottleneck.api",
    "train_head": "bottleneck.api",
    "backbone": "bottleneck.api",
    "FeatureSet": "bottleneck.api",
    "Split": "bottleneck.api",
    "Run": "bottleneck.api",
    "LogRegHead": "bottleneck.learn.heads",
    "KerasHead": "bottleneck.learn.heads",
    "KnnHead": "bottleneck.learn.heads",
    "BottleneckError": "bottleneck.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(_importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bottleneck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
