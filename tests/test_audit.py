"""The hash-chained audit log: appending, verifying, tampering, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from axme_fw.audit import (
    AUDIT_FILE,
    GENESIS,
    AuditWriter,
    Chain,
    VerifyResult,
    append,
    read,
    record,
    verify,
)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def log5(tmp_path: Path) -> Path:
    """An audit log of five records, appended in two batches."""
    path = tmp_path / AUDIT_FILE
    chain = Chain(path)
    chain.append([record("agent.killed", agent="a1"), record("agent.killed", agent="a2")])
    chain.append([record("agent.resumed", agent=f"a{i}") for i in (3, 4, 5)])
    return path


def test_append_builds_the_chain(log5: Path) -> None:
    raw = lines_of(log5)
    objs = [json.loads(line) for line in raw]
    assert [o["seq"] for o in objs] == [1, 2, 3, 4, 5]
    assert [o["agent"] for o in objs] == ["a1", "a2", "a3", "a4", "a5"]
    assert [o["event"] for o in objs] == ["agent.killed"] * 2 + ["agent.resumed"] * 3
    assert objs[0]["prev"] == GENESIS
    for before, obj in zip(raw, objs[1:], strict=False):
        assert obj["prev"] == hashlib.sha256(before.rstrip(b"\n")).hexdigest()
    assert list(objs[0]) == ["seq", "ts", "event", "agent", "prev"]
    head = json.loads(log5.with_suffix(".head").read_text())
    assert head == {"seq": 5, "sha256": hashlib.sha256(raw[-1].rstrip(b"\n")).hexdigest()}
    assert verify(log5) == VerifyResult(True, 5)
    assert [r["agent"] for r in read(log5)] == ["a1", "a2", "a3", "a4", "a5"]


def test_append_helper_writes_one_record(tmp_path: Path) -> None:
    append(tmp_path / "state", "agent.killed", agent="deployer", by="cli:alice")
    path = tmp_path / "state" / AUDIT_FILE
    (rec,) = list(read(path))
    assert (rec["seq"], rec["event"], rec["agent"], rec["by"]) == (
        1,
        "agent.killed",
        "deployer",
        "cli:alice",
    )
    assert verify(path) == VerifyResult(True, 1)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_edit_a_middle_line(log5: Path) -> None:
    raw = lines_of(log5)
    raw[1] = raw[1].replace(b'"a2"', b'"zz"')
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 2, f"{log5}:2: line 2 was changed (line 3 records another hash)"
    )


def test_edit_the_first_line(log5: Path) -> None:
    raw = lines_of(log5)
    raw[0] = raw[0].replace(b"agent.killed", b"agent.paused")
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 1, f"{log5}:1: line 1 was changed (line 2 records another hash)"
    )


def test_forged_first_line(log5: Path) -> None:
    raw = lines_of(log5)
    raw[0] = raw[0].replace(GENESIS.encode(), b"1" * 64)
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 1, f"{log5}:1: the first line does not start the chain"
    )


def test_edit_the_last_line_is_caught_by_the_head(log5: Path) -> None:
    raw = lines_of(log5)
    raw[4] = raw[4].replace(b'"a5"', b'"zz"')
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 5, f"{log5}:5: last line was edited or appended to without the chain"
    )


def test_delete_a_middle_line(log5: Path) -> None:
    raw = lines_of(log5)
    del raw[2]
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 3, f"{log5}:3: expected seq 3, found 4: a line was removed or inserted"
    )


@pytest.mark.parametrize("removed", [1, 2])
def test_delete_lines_at_the_end(log5: Path, removed: int) -> None:
    raw = lines_of(log5)
    rewrite(log5, raw[:-removed])
    kept = 5 - removed
    assert verify(log5) == VerifyResult(
        False, kept, f"{log5}:{kept + 1}: lines {kept + 1}..5 were removed from the end"
    )


def test_delete_everything(log5: Path) -> None:
    rewrite(log5, [])
    assert verify(log5) == VerifyResult(False, 0, f"{log5}:1: lines 1..5 were removed from the end")


def test_insert_a_copied_line(log5: Path) -> None:
    raw = lines_of(log5)
    raw.insert(2, raw[1])
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 3, f"{log5}:3: expected seq 3, found 2: a line was removed or inserted"
    )


def test_insert_a_forged_line_with_the_right_seq(log5: Path) -> None:
    raw = lines_of(log5)
    prev = hashlib.sha256(raw[1].rstrip(b"\n")).hexdigest()
    forged = json.dumps({"seq": 3, "event": "agent.resumed", "prev": prev}).encode() + b"\n"
    raw.insert(2, forged)
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 4, f"{log5}:4: expected seq 4, found 3: a line was removed or inserted"
    )


def test_append_outside_the_chain(log5: Path) -> None:
    raw = lines_of(log5)
    prev = hashlib.sha256(raw[4].rstrip(b"\n")).hexdigest()
    raw.append(json.dumps({"seq": 6, "event": "x", "prev": prev}).encode() + b"\n")
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(
        False, 6, f"{log5}:6: last line was edited or appended to without the chain"
    )


def test_garbage_line(log5: Path) -> None:
    raw = lines_of(log5)
    raw[3] = b"not json\n"
    rewrite(log5, raw)
    assert verify(log5) == VerifyResult(False, 4, f"{log5}:4: not a valid audit record")
    assert len(list(read(log5))) == 4  # read skips it


def test_torn_final_write_is_flagged_and_the_chain_continues(log5: Path) -> None:
    with open(log5, "ab") as fh:
        fh.write(b'{"seq": 6, "ev')
    Chain(log5).append([record("agent.killed", agent="a7")])
    raw = lines_of(log5)
    assert raw[5] == b'{"seq": 6, "ev\n'
    assert json.loads(raw[6])["prev"] == hashlib.sha256(raw[5].rstrip(b"\n")).hexdigest()
    assert verify(log5) == VerifyResult(False, 6, f"{log5}:6: not a valid audit record")


def test_no_log(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    assert verify(path) == VerifyResult(False, 0, f"{path}: no audit log")


def test_missing_head_next_to_a_log_fails(log5: Path) -> None:
    # Cutting lines off the end and deleting the head must not pass as "not anchored".
    head = log5.with_suffix(".head")
    head.unlink()
    rewrite(log5, lines_of(log5)[:3])
    assert verify(log5) == VerifyResult(
        False,
        3,
        f"{head}: missing: the end of the log cannot be verified (lines may have been removed)",
    )


def test_empty_log_without_head_is_ok(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    path.write_bytes(b"")
    assert verify(path) == VerifyResult(True, 0, "no head file: the end of the log is not anchored")


@pytest.mark.parametrize("content", ["{not json", "[5]"])
def test_unreadable_head_fails(log5: Path, content: str) -> None:
    head = log5.with_suffix(".head")
    head.write_text(content)
    result = verify(log5)
    assert (result.ok, result.lines) == (False, 5)
    assert result.problem.startswith(f"{head}: ")


# -- concurrent writers ----------------------------------------------------------------


def assert_one_chain(path: Path, expected: dict[str, int]) -> None:
    """Valid chain, seq 1..N, and each writer's records all present and in its order."""
    total = sum(expected.values())
    assert verify(path) == VerifyResult(True, total)
    recs = list(read(path))
    assert [r["seq"] for r in recs] == list(range(1, total + 1))
    for writer, count in expected.items():
        assert [r["i"] for r in recs if r.get("writer") == writer] == list(range(count))


def test_two_threads_with_their_own_chains(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    n = 150
    barrier = threading.Barrier(2)

    def run(writer: str) -> None:
        chain = Chain(path)
        barrier.wait()
        for i in range(n):
            chain.append([record("decision", writer=writer, i=i)], sync=False)

    threads = [threading.Thread(target=run, args=(w,)) for w in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_one_chain(path, {"t1": n, "t2": n})


def test_two_threads_sharing_one_chain(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    chain, n = Chain(path), 150
    barrier = threading.Barrier(2)

    def run(writer: str) -> None:
        barrier.wait()
        for i in range(n):
            chain.append([record("decision", writer=writer, i=i)], sync=False)

    threads = [threading.Thread(target=run, args=(w,)) for w in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_one_chain(path, {"t1": n, "t2": n})


WRITER = """
import sys
from pathlib import Path
from axme_fw.audit import Chain, record
path, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
chain = Chain(path)
sys.stdin.read()  # start together
for i in range(n):
    chain.append([record("decision", writer=name, i=i)], sync=False)
"""


def test_processes_append_concurrently(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    n, names = 300, ["p1", "p2", "p3", "p4"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), name, str(n)], stdin=subprocess.PIPE
        )
        for name in names
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert_one_chain(path, dict.fromkeys(names, n))


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.005)


def test_audit_writer_survives_any_exception_and_counts_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = AuditWriter(tmp_path, retry_delay=0.0)
    real_append = writer.chain.append
    calls: list[int] = []

    def flaky(records: list[dict[str, Any]], *, sync: bool = True) -> None:
        if any(r.get("boom") for r in records):
            calls.append(len(records))
            raise RuntimeError("not an OSError")
        real_append(records, sync=sync)

    writer.chain.append = flaky  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="axme_fw.audit")
    writer.write("decision", boom=True, i=0)
    writer.write("decision", boom=True, i=1)
    wait_for(lambda: calls == [2] * 5 and writer.dropped == 2)
    assert writer._thread.is_alive()

    writer.write("decision", writer="after", i=0)
    writer.close()
    assert not writer._thread.is_alive()
    assert writer.dropped == 2
    assert_one_chain(tmp_path / AUDIT_FILE, {"after": 1})
    tracebacks = [r for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert len(tracebacks) == 5
    assert "dropped 2 records" in caplog.text


def test_audit_writer_from_another_thread_then_close_flushes(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path)
    n = 2500  # more than one batch

    def produce() -> None:
        for i in range(n):
            writer.write("decision", writer="loop", i=i)

    t = threading.Thread(target=produce)
    t.start()
    t.join()
    # The CLI appends to the same log meanwhile, as another process would.
    append(tmp_path, "agent.killed", writer="cli", i=0)
    writer.close()
    assert not writer._thread.is_alive()
    assert_one_chain(tmp_path / AUDIT_FILE, {"loop": n, "cli": 1})
