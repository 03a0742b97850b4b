"""Content keys: the SHA-256 of a file's bytes, remembered by path, size, mtime and inode.

The index is a small SQLite file in the cache folder, so a rerun over unchanged files reads no
image at all. SQLite gives us atomic commits and safe concurrent use for free. It is only a cache
of hashes, so it never stops a run: a damaged index is rebuilt (with a line saying so), and where
it cannot be written (a read-only cache, a full disk) hashes are kept in memory for this run.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

from bottleneck import fs
from bottleneck.fs import sha256_bytes  # also the content key of bytes for this module's callers

INDEX_NAME = "file-hashes.sqlite"
_SCHEMA = "CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT)"
#: Shard listings (see `bottleneck.features.shards`), remembered by path and stamp: an unchanged shard is not listed again.
_SHARD_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shards (key BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, "
    "listing TEXT)"
)
_DAMAGED = ("file is not a database", "malformed", "database corrupt", "no such table", "no such column")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content (or a tar shard member's, see `bottleneck.features.shards`), read in 1 MiB chunks."""
    try:
        return fs.sha256_file(path)
    except NotADirectoryError:
        return sha256_bytes(_member_bytes(path))


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): what must be unchanged for a remembered hash to stay valid.

    A tar shard member's is its own size with its shard's mtime and inode."""
    try:
        st = os.stat(path)
    except NotADirectoryError:
        return _member(path).stamp
    return st.st_size, st.st_mtime_ns, st.st_ino


def _member(path: str | os.PathLike):
    from bottleneck.features.shards import member_of

    member = member_of(path)
    if member is None:
        raise NotADirectoryError(f"not a file, nor a member of a tar shard: {path}")
    return member


def _member_bytes(path: str | os.PathLike) -> bytes:
    from bottleneck.features.shards import read_member

    member = _member(path)
    return read_member(member, member.size)


class HashIndex:
    """Remembers the SHA-256 of files by absolute path and stamp (size, mtime, inode)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = Path(cache_dir) / INDEX_NAME
        self.writable = True
        self._db = self._connect()
        self._known: dict[str, tuple[int, int, int, str]] | None = None
        self._pending: list[tuple[bytes, int, int, int, str]] = []

    def _connect(self) -> sqlite3.Connection:
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=60)
            db.execute(_SCHEMA)
            db.execute(_SHARD_SCHEMA)
            db.commit()
            db.execute("SELECT path, size, mtime_ns, inode, sha256 FROM files LIMIT 1").fetchall()
            return db
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if _is_damaged(exc) and self._remove_damaged():
                _say(f"the hash index {self.path} was damaged ({exc}); rebuilt it (it only caches file hashes)")
                return self._connect()
            return self._read_only_or_memory()

    def _remove_damaged(self) -> bool:
        try:
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return True
        except OSError:
            return False

    def _read_only_or_memory(self) -> sqlite3.Connection:
        """The cache cannot be written: read what the index holds, remember new hashes in memory only."""
        self.writable = False
        if self.path.exists():
            try:
                db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=60)
                db.execute("SELECT path, size, mtime_ns, inode, sha256 FROM files LIMIT 1").fetchall()
                return db
            except sqlite3.Error:
                pass
        db = sqlite3.connect(":memory:")
        db.execute(_SCHEMA)
        db.execute(_SHARD_SCHEMA)
        return db

    def _load(self) -> dict[str, tuple[int, int, int, str]]:
        if self._known is None:
            try:
                rows = self._db.execute("SELECT path, size, mtime_ns, inode, sha256 FROM files").fetchall()
            except sqlite3.Error as exc:  # damaged beyond its first page
                _say(f"the hash index {self.path} could not be read ({exc}); files are hashed again")
                rows = []
            self._known = {os.fsdecode(row[0]): tuple(row[1:]) for row in rows}
        return self._known

    def lookup(self, path: str, stamp: tuple[int, int, int]) -> str | None:
        """The remembered hash of `path` if its stamp is unchanged, else None."""
        entry = self._load().get(path)
        if entry is not None and entry[:3] == stamp:
            return entry[3]
        return None

    def remember(self, path: str, stamp: tuple[int, int, int], sha256: str) -> None:
        """Queue `path`'s hash; `flush` writes the queue in one transaction."""
        self._load()[path] = (*stamp, sha256)
        # Paths are stored as bytes: Linux file names need not be valid UTF-8.
        self._pending.append((os.fsencode(path), *stamp, sha256))

    def flush(self) -> None:
        """Write the queued hashes to disk (where the disk takes them: they are only a cache)."""
        if not self._pending:
            return
        if self.writable:
            try:
                with self._db:
                    self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", self._pending)
            except sqlite3.Error:  # read-only or full disk: this run keeps them in memory
                self.writable = False
        self._pending.clear()

    def hash_file(self, path: str | os.PathLike) -> str:
        """The file's SHA-256, from the index when the file is unchanged."""
        key = str(Path(path).absolute())
        stamp = file_stamp(key)
        known = self.lookup(key, stamp)
        if known is None:
            known = sha256_file(key)
            self.remember(key, stamp, known)
        return known

    def shard_listing(self, key: str, stamp: tuple[int, int, int]) -> str | None:
        """The listing remembered for shard `key` if its stamp is unchanged, else None."""
        try:
            row = self._db.execute(
                "SELECT size, mtime_ns, inode, listing FROM shards WHERE key = ?", (os.fsencode(key),)
            ).fetchone()
        except sqlite3.Error:  # an index of an older version (read-only), or damaged: list the shard again
            return None
        return row[3] if row is not None and tuple(row[:3]) == tuple(stamp) else None

    def remember_shard_listing(self, key: str, stamp: tuple[int, int, int], listing: str) -> None:
        """Write a shard's listing now (where the disk takes it: it is only a cache)."""
        if not self.writable:
            return
        try:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)", (os.fsencode(key), *stamp, listing)
                )
        except sqlite3.Error:
            self.writable = False

    def close(self) -> None:
        self.flush()
        self._db.close()


def _is_damaged(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(text in str(exc).lower() for text in _DAMAGED)


def _say(message: str) -> None:
    print(f"bottleneck: {message}", file=sys.stderr, flush=True)
