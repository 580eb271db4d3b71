"""State: hash-chained audit log: ``state/audit.jsonl``.

Each line is one JSON object ``{"seq", "ts", "event", ..., "prev"}`` where ``prev`` is
the SHA-256 of the previous line's bytes (64 zeros for the first). ``audit.head``
beside it records the last line's ``seq`` and hash, so deleting lines at the end is
detected too. Writers (the proxy and the CLI) append under a file lock and re-read
the tail each time, so several processes keep one chain.

The proxy never writes on its event loop: :class:`AuditWriter` queues records and a
daemon thread appends them in batches (one fsync per batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

GENESIS = "0" * 64
AUDIT_FILE = "audit.jsonl"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(fh: Any) -> bytes | None:
    """The last complete line of a binary file opened for reading, or None if empty."""
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end == 0:
        return None
    block, pos, tail = 8192, end, b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        tail = fh.read(step) + tail
        # The file ends in "\n"; look for the newline before the last line.
        idx = tail.rfind(b"\n", 0, len(tail) - 1)
        if idx >= 0:
            return bytes(tail[idx + 1 :])
        block *= 2
    return bytes(tail)


class Chain:
    """Appends records to one audit file, keeping the chain, under a cross-process lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.head = path.with_suffix(".head")
        self.lock = FileLock(str(path) + ".lock")

    def append(self, records: list[dict[str, Any]], *, sync: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock, open(self.path, "a+b") as fh:
            last = _last_line(fh)
            if last is not None and not last.endswith(b"\n"):
                last += b"\n"  # a torn final write: chain onto what is there, verify flags it
                fh.write(b"\n")
            prev = _line_hash(last) if last is not None else GENESIS
            seq = _seq_of(last)
            out = []
            for rec in records:
                seq += 1
                line = json.dumps(
                    {"seq": seq, **rec, "prev": prev}, separators=(",", ":"), default=str
                ).encode()
                prev = _line_hash(line)
                out.append(line + b"\n")
            fh.write(b"".join(out))
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
            tmp = self.head.with_name(f".{self.head.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"seq": seq, "sha256": prev}))
            os.replace(tmp, self.head)


def _seq_of(line: bytes | None) -> int:
    if line is None:
        return 0
    try:
        return int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        return 0


def record(event: str, **fields: Any) -> dict[str, Any]:
    return {"ts": now_iso(), "event": event, **fields}


def append(state_dir: Path, event: str, **fields: Any) -> None:
    """Append one record synchronously (the CLI's path; never call this on the event loop)."""
    Chain(state_dir / AUDIT_FILE).append([record(event, **fields)])


class AuditWriter:
    """Queue records from the event loop; a daemon thread appends them in batches.

    The thread outlives any error: a batch that cannot be appended (disk full, a bug,
    anything raised) is retried ``ATTEMPTS`` times, logged with its traceback each
    time, then dropped and counted in :attr:`dropped`; later records are still written.
    """

    ATTEMPTS = 5

    def __init__(self, state_dir: Path, *, retry_delay: float = 0.2) -> None:
        self.chain = Chain(state_dir / AUDIT_FILE)
        self.retry_delay = retry_delay  # seconds; attempt k waits k * retry_delay after failing
        self.dropped = 0  # records given up on; only the writer thread changes it
        self.failing = False  # the last append failed (readiness reads it)
        self.failures = 0  # failed append attempts (metrics)
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="axme-fw-audit", daemon=True)
        self._thread.start()

    def write(self, event: str, **fields: Any) -> None:
        """Non-blocking; safe from any thread."""
        self._queue.put(record(event, **fields))

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        done = False
        while not done:
            batch: list[dict[str, Any]] = []
            item = self._queue.get()
            while True:
                if item is None:
                    done = True
                    break
                batch.append(item)
                if len(batch) >= 1000:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._append(batch)

    def _append(self, batch: list[dict[str, Any]]) -> None:
        """Append ``batch``; never raises (a dead writer would silently stop the audit)."""
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                self.chain.append(batch)
                self.failing = False
                return
            except Exception:  # disk full, permissions, a bug: keep the proxy up, say so loudly
                log.exception(
                    "audit: cannot append %d records to %s (attempt %d of %d)",
                    len(batch),
                    self.chain.path,
                    attempt,
                    self.ATTEMPTS,
                )
            self.failing = True
            self.failures += 1
            if attempt < self.ATTEMPTS:
                time.sleep(self.retry_delay * attempt)
        self.dropped += len(batch)
        log.error("audit: dropped %d records (%d in all)", len(batch), self.dropped)


# ---------------------------------------------------------------- reading and verifying


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int
    problem: str = ""


def verify(path: Path) -> VerifyResult:
    """Check every line's ``prev`` and ``seq``, then the head anchor.

    The first bad line is named: an edited line breaks the ``prev`` of the line after
    it (or the head, for the last line); an inserted or deleted line breaks ``seq``.
    A non-empty log without its head fails: the end could have been cut off. Only an
    empty log may lack a head (``ok`` with a note); an absent log fails.
    """
    if not path.exists():
        return VerifyResult(False, 0, f"{path}: no audit log")
    prev, n = GENESIS, 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                obj = json.loads(raw)
                seq, claimed = obj["seq"], obj["prev"]
            except (ValueError, KeyError, TypeError):
                return VerifyResult(False, n, f"{path}:{n}: not a valid audit record")
            if seq != n:
                return VerifyResult(
                    False,
                    n,
                    f"{path}:{n}: expected seq {n}, found {seq}: a line was removed or inserted",
                )
            if claimed != prev:
                if n == 1:
                    return VerifyResult(
                        False, 1, f"{path}:1: the first line does not start the chain"
                    )
                return VerifyResult(
                    False,
                    n - 1,
                    f"{path}:{n - 1}: line {n - 1} was changed (line {n} records another hash)",
                )
            prev = _line_hash(raw)
    head_path = path.with_suffix(".head")
    try:
        head = json.loads(head_path.read_text())
    except FileNotFoundError:
        if n == 0:  # nothing was ever appended: there is no end to anchor
            return VerifyResult(True, 0, "no head file: the end of the log is not anchored")
        # Deleting lines at the end and then the head would otherwise pass unnoticed.
        return VerifyResult(
            False,
            n,
            f"{head_path}: missing: the end of the log cannot be verified "
            "(lines may have been removed)",
        )
    except (OSError, ValueError) as exc:
        return VerifyResult(False, n, f"{head_path}: unreadable: {exc}")
    if not isinstance(head, dict):
        return VerifyResult(False, n, f"{head_path}: not a valid head record")
    if head.get("seq") != n or head.get("sha256") != prev:
        if isinstance(head.get("seq"), int) and head["seq"] > n:
            return VerifyResult(
                False, n, f"{path}:{n + 1}: lines {n + 1}..{head['seq']} were removed from the end"
            )
        return VerifyResult(
            False, n, f"{path}:{n}: last line was edited or appended to without the chain"
        )
    return VerifyResult(True, n)


def read(path: Path) -> Iterator[Mapping[str, Any]]:
    """Records in order; unparseable lines are skipped (``verify`` reports them)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


# Per-request records: the timeline shows them only when asked (--all, all=1).
NOISY = frozenset({"decision", "llm.usage", "kill.written", "limit.throttled"})


def since_iso(value: str | None) -> str | None:
    """``1h`` / ``30m`` / ``2026-11-30T06:00:00Z`` → an ISO time to compare records with.

    Raises ValueError (the message names the value and what to use instead).
    """
    if value is None:
        return None
    from datetime import UTC, datetime, timedelta

    from .yamlnodes import parse_duration

    seconds = parse_duration(value)
    if seconds is not None:
        then = datetime.now(UTC) - timedelta(seconds=seconds)
    else:
        try:
            then = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r}: use a duration (30m, 1h, 2d) or an ISO time") from None
        if then.tzinfo is None:
            then = then.replace(tzinfo=UTC)
    return then.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def select(path: Path, agent: str | None, since: str | None) -> Iterator[Mapping[str, Any]]:
    """The records of ``path`` about ``agent`` (all when None) since an ISO time."""
    for rec in read(path):
        if agent is not None and rec.get("agent") != agent:
            continue
        if since is not None and str(rec.get("ts", "")) < since:
            continue
        yield rec
