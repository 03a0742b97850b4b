"""bottleneck: transfer learning through a content-keyed feature cache."""
__version__ = "0.1.0"
