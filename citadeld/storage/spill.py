"""Local files that keep durable state while PostgreSQL is away.

``SpillFile``: audit, health and task rows that overflow the in-memory buffer during a
PostgreSQL outage, as JSON lines (fsynced per append). Replay renames the file first, so rows
spilled during a replay go to a fresh file and nothing is read twice or lost; a torn last line
(a crash mid-append) is skipped and counted.

``OutboxMarker``: a file that exists while this daemon may have queued vector writes in the
PostgreSQL outbox. It is written (and fsynced) *before* the first write is queued, so a daemon
starting without it knows there is nothing to replay even when PostgreSQL is down, and new
writes can go straight to Qdrant without overtaking older queued ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("citadeld.persistence")

# (kind: audit | health | task, row); an audit row may be a list (persistence.AUDIT_FIELDS), or
# that list already encoded (an orjson Fragment: the request trail's); read back, it is a list
Row = tuple[str, dict[str, Any] | list[Any] | orjson.Fragment]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SpillFile:
    """Thread-safe (its callers run it in an executor). Bounded by ``max_bytes`` in total."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "rows.jsonl"
        self.replaying = self.dir / "rows.replaying.jsonl"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.rows = self._count_rows()  # rows waiting in both files (approximate after a crash)

    def _count_rows(self) -> int:
        n = 0
        for p in (self.replaying, self.path):
            with contextlib.suppress(OSError):
                with open(p, "rb") as f:
                    n += sum(1 for _ in f)
        return n

    def size(self) -> int:
        total = 0
        for p in (self.path, self.replaying):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def append(self, rows: list[Row]) -> tuple[int, int]:
        """Append rows; returns (written, dropped for lack of room or a failed write)."""
        if not rows:
            return 0, 0
        with self._lock:
            room = self.max_bytes - self.size()
            lines: list[bytes] = []
            used = 0
            for kind, row in rows:
                line = orjson.dumps({"k": kind, "r": row}, default=str) + b"\n"
                if used + len(line) > room:
                    break
                lines.append(line)
                used += len(line)
            if not lines:
                return 0, len(rows)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                new = not self.path.exists()
                with open(self.path, "ab") as f:
                    f.write(b"".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
                if new:
                    _fsync_dir(self.dir)
            except OSError as exc:
                log.error("cannot write the spill file %s: %s", self.path, exc)
                return 0, len(rows)
            self.rows += len(lines)
            return len(lines), len(rows) - len(lines)

    def take(self) -> Path | None:
        """The file to replay next (an interrupted replay first), or None when nothing waits."""
        with self._lock:
            if self.replaying.exists():
                return self.replaying
            try:
                if self.path.stat().st_size == 0:
                    return None
            except FileNotFoundError:
                return None
            os.replace(self.path, self.replaying)
            _fsync_dir(self.dir)
            return self.replaying

    @staticmethod
    def read(path: Path) -> tuple[list[Row], int]:
        """Rows of a spill file, and the number of unreadable (torn) lines skipped."""
        rows: list[Row] = []
        bad = 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    item = orjson.loads(line)
                    row = item["r"]
                    rows.append((str(item["k"]), row if isinstance(row, list) else dict(row)))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    bad += 1
        return rows, bad

    def done(self, path: Path, rows: int) -> None:
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.rows = max(0, self.rows - rows)


class OutboxMarker:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def present(self) -> bool:
        return self.path.exists()

    def set(self) -> None:
        if self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.write(b"vector writes may be queued in the PostgreSQL outbox\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.path.parent)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
