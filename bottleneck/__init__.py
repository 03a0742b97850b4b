"""bottleneck: transfer learning through a content-keyed feature cache."""
import warnings as _warnings

__version__ = "0.1.0"

# pandas (imported by scikit-learn and Ray Data when installed) looks for the numerical library that is
# also called `bottleneck`, finds this package instead and warns; it then simply does without it.
_warnings.filterwarnings("ignore", message=r"Pandas requires version .* of 'bottleneck'", category=UserWarning)
