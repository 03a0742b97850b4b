"""The one family of user-facing errors. The CLI prints them as one line and exits with code 2."""


class BottleneckError(Exception):
    """An error the user can fix: bad input, a missing file, a locked or unwritable cache."""


class DataError(BottleneckError):
    """The image folder is missing, empty, or not laid out one sub-folder per class."""


class CacheError(BottleneckError):
    """The feature cache cannot be created, locked, read or written."""


class BackboneError(BottleneckError):
    """The backbone cannot be built: unknown weights, unreadable weights file, bad input size."""


class StrictModeError(BottleneckError):
    """Some images failed and `--strict` asked for that to be an error."""
