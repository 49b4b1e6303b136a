"""The event store: SQLite (WAL), written by one thread off the loop, migrated by version.

Every `new`, `update` and `end` upserts its event's row; snapshots' paths are filled in when
they are written. Retention (by age and by count) runs in the writer every few minutes and at
start. WAL mode with `synchronous=NORMAL`: a kill -9 loses at most the last transactions, never
the file (tested). Readers (`framegrid events`, `GET /api/events`) open their own connection.

Schema versions live in `MIGRATIONS` (applied in order; `PRAGMA user_version` says which ran).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.payloads import EventPayload
from streams.disk import disk_state

log = logging.getLogger(__name__)

MIGRATIONS = [
    # 1: events and their snapshots
    """
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        stream TEXT NOT NULL,
        label TEXT NOT NULL,
        track_id INTEGER NOT NULL,
        start_time REAL NOT NULL,
        end_time REAL,
        best_score REAL NOT NULL,
        zones TEXT NOT NULL,
        data TEXT NOT NULL,
        crop_path TEXT,
        frame_path TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX events_start ON events (start_time);
    CREATE INDEX events_stream_start ON events (stream, start_time);
    CREATE INDEX events_label_start ON events (label, start_time);
    """,
    # 2: event clips, and the media's sizes (one disk budget for clips and snapshots)
    """
    ALTER TABLE events ADD COLUMN clip_path TEXT;
    ALTER TABLE events ADD COLUMN clip_size INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE events ADD COLUMN clip_start REAL;
    ALTER TABLE events ADD COLUMN clip_end REAL;
    ALTER TABLE events ADD COLUMN snapshot_size INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX events_media ON events (start_time) WHERE clip_path IS NOT NULL OR crop_path IS NOT NULL;
    """,
    # 3: continuous recording's segments (in the same disk budget)
    """
    CREATE TABLE segments (
        path TEXT PRIMARY KEY,
        stream TEXT NOT NULL,
        start_time REAL NOT NULL,
        end_time REAL NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE INDEX segments_start ON segments (start_time);
    """,
]
RETENTION_EVERY_S = 300.0
MEDIA_RETENTION_EVERY_S = 10.0  # the disk budget is checked this often while media are written
MAX_BATCH = 1000  # writes in one transaction; also the most held in memory while the disk is full
RETRY_FULL_S = 1.0  # a batch the full disk refused is tried again this often


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
        _wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def _wal(conn: sqlite3.Connection, timeout: float = 10.0) -> None:
    """Switch to write-ahead logging. The switch can answer 'database is locked' at once, without
    waiting the busy timeout, while another process switches the same new file: it is tried again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version. The version is read under the write lock, so processes
    opening one file together (cluster nodes on one machine) migrate it once: the others wait, then
    find it done."""
    level, conn.isolation_level = conn.isolation_level, None  # transactions by hand
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):  # DDL only: no ';' inside statements
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {i}")
                log.info("event store: schema version %d", i)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.isolation_level = level
    return len(MIGRATIONS)


def query(path: Path, stream: str | None = None, label: str | None = None, since: float | None = None,
          limit: int = 100, event_id: str | None = None) -> list[dict[str, Any]]:
    """Events, newest first, filtered (a reader's own connection)."""
    if not path.exists():
        return []
    conn = connect(path, readonly=True)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            return []  # the file exists but its writer has not created the schema yet: no events
        sql, args = "SELECT * FROM events WHERE 1=1", []
        for col, op, val in (("stream", "=", stream), ("label", "=", label), ("start_time", ">=", since),
                             ("id", "=", event_id)):
            if val is not None:
                sql += f" AND {col} {op} ?"
                args.append(val)
        sql += " ORDER BY start_time DESC LIMIT ?"
        args.append(limit)
        rows = conn.execute(sql, args).fetchall()
    finally:
        conn.close()
    return [{"id": r["id"], "stream": r["stream"], "label": r["label"], "track_id": r["track_id"],
             "start_time": r["start_time"], "end_time": r["end_time"], "best_score": r["best_score"],
             "zones": json.loads(r["zones"]), "crop_path": r["crop_path"], "frame_path": r["frame_path"],
             "clip_path": r["clip_path"], "clip_size": r["clip_size"], "clip_start": r["clip_start"],
             "clip_end": r["clip_end"], "data": json.loads(r["data"])} for r in rows]


def segment_id(stream: str, start: float) -> str:
    """A continuous segment's id in the API: its stream and start (ms), unique across a cluster."""
    return f"{stream}-{round(start * 1000)}"


def segments(path: Path, stream: str | None = None, since: float | None = None, until: float | None = None,
             limit: int = 1000, segment: str | None = None) -> list[dict[str, Any]]:
    """Continuous-recording segments that overlap [since, until], oldest first (or the one `segment` id)."""
    if segment is not None:
        stream, _, ms = segment.rpartition("-")
        if not stream or not ms.isdigit():
            return []
    if not path.exists():
        return []
    conn = connect(path, readonly=True)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 3:
            return []  # no segments table yet
        sql, args = "SELECT * FROM segments WHERE 1=1", []
        for cond, val in (("stream = ?", stream), ("end_time >= ?", since), ("start_time <= ?", until)):
            if val is not None:
                sql += f" AND {cond}"
                args.append(val)
        if segment is not None:  # the start as stored, to the millisecond
            sql += " AND abs(start_time * 1000 - ?) < 0.5"
            args.append(int(ms))
        sql += " ORDER BY start_time LIMIT ?"
        args.append(limit)
        rows = conn.execute(sql, args).fetchall()
    finally:
        conn.close()
    return [{"id": segment_id(r["stream"], r["start_time"]), "stream": r["stream"], "path": r["path"],
             "start_time": r["start_time"], "end_time": r["end_time"], "size": r["size"]} for r in rows]


class EventStore:
    """The writer: `put(event)` from the loop (never blocks); one thread does the SQL.

    Its queue is bounded (`max_queue` items, policy `drop_newest`): when the disk cannot keep up, new
    writes are counted in `dropped` and logged, never held in memory without limit. The writer takes
    everything waiting in one transaction, so the bound is reached only by a stalled disk."""

    def __init__(self, path: Path, max_age_days: float, max_events: int, max_queue: int,
                 media_bytes: int = 10 << 30, retain_days: dict[str, float] | None = None) -> None:
        self.path = path
        self.max_age_s = max_age_days * 86400
        self.max_events = max_events
        self.media_bytes = media_bytes  # clips and snapshots together
        self.retain_days = retain_days or {"default": 10.0}  # per label, of the media (the events stay)
        self.media_deleted = 0  # events whose media retention deleted
        self.media_size = 0  # bytes of media the store knows of, at the last check
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(max_queue)
        self.dropped = 0  # writes refused because the queue was full
        self._thread: threading.Thread | None = None
        self.written = 0
        self.errors = 0
        self.disk = disk_state("event store")

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        try:
            migrate(conn)
            self._retention(conn)
            self._media_retention(conn)
        finally:
            conn.close()
        self._thread = threading.Thread(target=self._run, name="events.store", daemon=True)
        self._thread.start()

    def put(self, event: EventPayload) -> None:
        self._offer(("event", event))

    def set_snapshot(self, event_id: str, crop: str | None, frame: str | None) -> None:
        self._offer(("snapshot", (event_id, crop, frame)))

    def set_clip(self, event_id: str, path: str, size: int, start: float, end: float) -> None:
        self._offer(("clip", (event_id, path, size, start, end)))

    def add_segment(self, stream: str, path: str, size: int, start: float, end: float) -> None:
        self._offer(("segment", (stream, path, size, start, end)))

    def _offer(self, item: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("event store: %d write(s) dropped: the writer cannot keep up with %s", self.dropped,
                          self.path)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            try:  # the stop mark waits for room (the writer is draining), at most `timeout`
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.error("event store: writer stalled; %d write(s) not stored", self._queue.qsize())
            self._thread.join(timeout)

    def _run(self) -> None:
        conn = connect(self.path)
        last_retention = last_media = time.monotonic()
        media_written = False
        held: list[tuple[str, Any] | None] = []  # a batch the full disk refused, retried until it fits
        try:
            while True:
                batch = held
                if len(batch) >= MAX_BATCH:  # holding all it may: the rest waits in the queue (bounded)
                    time.sleep(RETRY_FULL_S)
                else:
                    with contextlib.suppress(queue.Empty):  # while holding, wake up to retry even so
                        batch = [*held, self._queue.get(timeout=RETRY_FULL_S if held else None)]
                    while batch[-1] is not None and len(batch) < MAX_BATCH:  # what waits, in one transaction
                        try:
                            batch.append(self._queue.get_nowait())
                        except queue.Empty:
                            break
                stop = any(i is None for i in batch)
                held = []
                try:
                    with conn:
                        for entry in batch:
                            if entry is not None:
                                self._write(conn, *entry)
                    self.written += sum(1 for e in batch if e is not None and e[0] == "event")
                    self.disk.wrote()
                except sqlite3.Error as exc:
                    if self.disk.failed(exc, str(self.path)) and not stop:
                        held = batch  # nothing of it was stored (the transaction rolled back): try again
                    else:
                        self.errors += 1
                        log.error("event store: %s (%d item(s) lost)", exc, len(batch))
                self.disk.held = len(held)
                if held:
                    continue
                media_written = media_written or any(e is not None and e[0] != "event" for e in batch)
                if media_written and time.monotonic() - last_media > MEDIA_RETENTION_EVERY_S:
                    self._housekeeping(conn, self._media_retention)
                    last_media, media_written = time.monotonic(), False
                if time.monotonic() - last_retention > RETENTION_EVERY_S:
                    self._housekeeping(conn, self._retention, self._media_retention)
                    last_retention = time.monotonic()
                if stop:
                    return
        finally:
            conn.close()

    def _housekeeping(self, conn: sqlite3.Connection, *steps: Callable[[sqlite3.Connection], None]) -> None:
        """Retention on the writer's thread: a failure (a full disk refuses even a delete's journal) is
        counted and tried again at the next round, never the end of the writer."""
        try:
            for step in steps:
                step(conn)
        except sqlite3.Error as exc:
            self.disk.failed(exc, f"{self.path} (retention)")

    def _write(self, conn: sqlite3.Connection, kind: str, value: Any) -> None:
        if kind == "snapshot":
            event_id, crop, frame = value
            size = sum(Path(p).stat().st_size for p in (crop, frame) if p and Path(p).is_file())
            conn.execute("UPDATE events SET crop_path = ?, frame_path = ?, snapshot_size = ? WHERE id = ?",
                         (crop, frame, size, event_id))
            return
        if kind == "segment":
            stream, path, size, start, end = value
            conn.execute("INSERT OR REPLACE INTO segments (path, stream, start_time, end_time, size) "
                         "VALUES (?, ?, ?, ?, ?)", (path, stream, start, end, size))
            return
        if kind == "clip":
            event_id, path, size, start, end = value
            conn.execute("UPDATE events SET clip_path = ?, clip_size = ?, clip_start = ?, clip_end = ? WHERE id = ?",
                         (path, size, start, end, event_id))
            return
        after = value["after"]
        conn.execute(
            """INSERT INTO events (id, stream, label, track_id, start_time, end_time, best_score, zones, data,
                                   updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET label = excluded.label, end_time = excluded.end_time,
                   best_score = excluded.best_score, zones = excluded.zones, data = excluded.data,
                   updated_at = excluded.updated_at""",
            (after["id"], value["stream"], after["label"], after["track_id"], after["first_seen"],
             after["last_seen"] if value["type"] == "end" else None, after["best_score"],
             json.dumps(after["entered_zones"]), json.dumps(after), time.time()))

    def _retention(self, conn: sqlite3.Connection) -> None:
        cutoff = time.time() - self.max_age_s
        with conn:
            old = conn.execute("SELECT crop_path, frame_path, clip_path FROM events WHERE start_time < ?",
                               (cutoff,)).fetchall()
            conn.execute("DELETE FROM events WHERE start_time < ?", (cutoff,))
            extra = conn.execute("SELECT crop_path, frame_path, clip_path FROM events ORDER BY start_time DESC "
                                 "LIMIT -1 OFFSET ?", (self.max_events,)).fetchall()
            conn.execute("DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY start_time DESC "
                         "LIMIT -1 OFFSET ?)", (self.max_events,))
        for row in [*old, *extra]:
            for p in row:
                if p:
                    Path(p).unlink(missing_ok=True)
        if old or extra:
            log.info("event store: retention deleted %d event(s)", len(old) + len(extra))

    def _media_retention(self, conn: sqlite3.Connection) -> None:
        """Clips and snapshots past their label's days, then the oldest until all fit `media_bytes`: their
        files are deleted and their paths cleared; the events themselves stay."""
        now = time.time()
        default = self.retain_days.get("default", 10.0)
        rows = [dict(r) for r in conn.execute(
            "SELECT id, label, start_time, crop_path, frame_path, clip_path, clip_size, snapshot_size FROM events "
            "WHERE clip_path IS NOT NULL OR crop_path IS NOT NULL")]
        # continuous segments: label `continuous` for retain_days, in the one budget, oldest first with the rest
        rows += [{"id": None, "label": "continuous", "start_time": r["start_time"], "crop_path": None,
                  "frame_path": None, "clip_path": r["path"], "clip_size": r["size"], "snapshot_size": 0}
                 for r in conn.execute("SELECT path, start_time, size FROM segments")]
        rows.sort(key=lambda r: r["start_time"])
        expired = [r for r in rows if r["start_time"] < now - self.retain_days.get(r["label"], default) * 86400]
        gone_ids = {id(r) for r in expired}
        kept = [r for r in rows if id(r) not in gone_ids]
        total = sum(r["clip_size"] + r["snapshot_size"] for r in kept)
        gone = list(expired)
        for r in kept:  # oldest first, until the rest fits
            if total <= self.media_bytes:
                break
            gone.append(r)
            total -= r["clip_size"] + r["snapshot_size"]
        if gone:
            with conn:
                conn.executemany("UPDATE events SET crop_path = NULL, frame_path = NULL, clip_path = NULL, "
                                 "clip_size = 0, snapshot_size = 0 WHERE id = ?",
                                 [(r["id"],) for r in gone if r["id"] is not None])
                conn.executemany("DELETE FROM segments WHERE path = ?",
                                 [(r["clip_path"],) for r in gone if r["id"] is None])
            for r in gone:
                for p in (r["crop_path"], r["frame_path"], r["clip_path"]):
                    if p:
                        Path(p).unlink(missing_ok=True)
            self.media_deleted += len(gone)
            log.info("event store: media of %d event(s) deleted (retention: %.1f MB kept of %.1f MB allowed)",
                     len(gone), total / 1e6, self.media_bytes / 1e6)
        self.media_size = total
