"""The HDF5 feature store: one per exact backbone, keyed by image content, crash-safe, growing by what is new.

Layout in the cache folder, for a backbone fingerprint FP (the names are built in `bottleneck.naming`):

    FP.h5        the index, what readers open: `features` (N, D) and `content_hash` (N,) as HDF5
                 virtual datasets over the segment files, group `failures` (path, content_hash,
                 reason), group `segments` (which rows of which segment), attributes.
    FP.segments/ seg-*.h5: the rows themselves, each file `features`, `content_hash`,
                 `source_path`, `failures`; written once, never edited.
    FP.parts/    batches committed by a run that has not finished (same datasets).
    FP.lock      held by the one run writing this store.

Every file is written under a temporary name, flushed to disk and renamed, so a reader or a
killed run only ever sees whole files. A run commits each batch as a part; at its end the new
rows of its parts become one new segment and the index is rebuilt: adding images writes the
new rows and a small index, never the old rows again. Small segments are merged with their
neighbours of similar size (as a binary counter: each row is rewritten a few times at most,
and never once its segment reaches `SMALL_SEGMENT_BYTES`); `bottleneck cache compact` rewrites
all of them into one. A killed run leaves its parts (and perhaps a new segment not yet in the
index); the next run reads them as they are and brings them in.

A store written before segments existed (format 1) holds its rows in FP.h5 itself; it is read
as it is and becomes the first segment (a rename, not a copy) the next time rows are added.
"""

from bottleneck.features.store.layout import (
    COMPUTED_BY,
    DTYPES,
    FORMAT_VERSION,
    SMALL_SEGMENT_BYTES,
    UNRECORDED,
    Failure,
    StoredFeatures,
    StoreIndex,
    add_counts,
)
from bottleneck.features.store.read import FeatureStore, StoreSnapshot
from bottleneck.features.store.write import FeatureWriter, MemoryWriter, StoreWriter

__all__ = [
    "COMPUTED_BY",
    "DTYPES",
    "FORMAT_VERSION",
    "SMALL_SEGMENT_BYTES",
    "UNRECORDED",
    "Failure",
    "FeatureStore",
    "FeatureWriter",
    "MemoryWriter",
    "StoreIndex",
    "StoreSnapshot",
    "StoreWriter",
    "StoredFeatures",
    "add_counts",
]
