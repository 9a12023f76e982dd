"""Resumes in-process, against the spool: what a reconnect gets when the record is torn, racing
a sweep, long, or resumed too often, and what the spool sweep may touch. Most of these come
from the second outside probe (issue 20)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest

from dify_proxy import answers as answers_module
from dify_proxy import create_app
from dify_proxy.answers import Answers
from tests.conftest import DIFY_URL
from tests.support import tokens

CHAT = f"{DIFY_URL}/chat-messages"
OWNER = "5b1f0c2e-1111-4a6f-9d3e-0a1b2c3d4e5f"


def dify_event(event: str, **fields) -> bytes:
    payload = {"event": event, "conversation_id": "c", "message_id": "m", "task_id": "t"}
    return b"data: " + json.dumps({**payload, **fields}).encode() + b"\n\n"


def answer_of(n: int, pad: int = 0) -> bytes:
    return b"".join(dify_event("message", answer="w" + "x" * pad) for _ in range(n)) + dify_event(
        "message_end", metadata={"usage": {"total_tokens": 3}}
    )


@pytest.fixture
def spool(tmp_path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def settings(settings, spool):
    return dataclasses.replace(
        settings, resume_spool_dir=str(spool), dify_read_timeout=1.0, resume_grace=0.0
    )


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.hs256(sub=OWNER)}"}


def ask(client, auth, requests_mock, body: bytes) -> list[str]:
    """A whole answer, streamed with ids; its event ids."""
    requests_mock.post(
        CHAT, content=body, headers={"Content-Type": "text/event-stream; charset=utf-8"}
    )
    response = client.post(
        "/api/chat", json={"message": "hi"}, headers={**auth, "Accept": "text/event-stream"}
    )
    ids = re.findall(rb"\nid: (\S+)\n", response.get_data())
    return [i.decode() for i in ids]


def resume(client, auth, last_id: str, **kwargs):
    return client.post(
        "/api/chat",
        json={},
        headers={**auth, "Accept": "text/event-stream", "Last-Event-ID": last_id},
        **kwargs,
    )


def test_a_record_torn_by_a_short_write_on_a_full_disk_answers_204_not_500(
    client, auth, requests_mock, monkeypatch
):
    """L1: the short write was ignored and the record read back as a 500 (ValueError)."""
    real_write = os.write
    torn = []

    def short_write(fd, data):
        if b"message_end" in data and not torn:
            torn.append(fd)
            return real_write(fd, data[: len(data) // 2])
        return real_write(fd, data)

    monkeypatch.setattr(answers_module.os, "write", short_write)
    ids = ask(client, auth, requests_mock, answer_of(3))
    assert torn
    monkeypatch.setattr(answers_module.os, "write", real_write)

    assert resume(client, auth, ids[0]).status_code == 204


def test_a_record_swept_between_finding_and_reading_it_answers_204_not_500(
    client, auth, requests_mock, monkeypatch, spool
):
    """L4: the sweep deleted the record after its existence was checked, before it was read."""
    ids = ask(client, auth, requests_mock, answer_of(3))
    record = str(spool / ids[0].rsplit("-", 1)[0])
    real_exists, real_open = os.path.exists, os.open

    def swept_after_looking(path):
        found = real_exists(path)
        if path == record:
            os.unlink(record)
        return found

    def swept_before_opening(path, *args, **kwargs):
        if path == record and real_exists(record):
            os.unlink(record)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(answers_module.os.path, "exists", swept_after_looking)
    monkeypatch.setattr(answers_module.os, "open", swept_before_opening)

    assert resume(client, auth, ids[0]).status_code == 204


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_a_204_after_the_end_of_a_long_answer_reads_only_the_records_end(
    client, auth, requests_mock, spool
):
    """L10: deciding that the client saw everything re-read the whole record."""
    ids = ask(client, auth, requests_mock, answer_of(1000, pad=1000))
    size = (spool / ids[0].rsplit("-", 1)[0]).stat().st_size
    assert size > 1_000_000
    before = bytes_read()
    assert resume(client, auth, ids[-1]).status_code == 204
    assert bytes_read() - before < 64 * 1024


def test_an_id_with_non_ascii_digits_names_no_answer(client, auth, requests_mock):
    ids = ask(client, auth, requests_mock, answer_of(3))
    stream_id = ids[0].rsplit("-", 1)[0]
    assert resume(client, auth, f"{stream_id}-\u0661").status_code == 204  # ARABIC-INDIC ONE


# --- how many resumes a user may have ---------------------------------------------------------


@pytest.fixture
def two_resumes(settings):
    return create_app(dataclasses.replace(settings, max_resumes_per_user=2)).test_client()


def test_a_user_gets_at_most_max_resumes_at_once(two_resumes, auth, requests_mock):
    """H1: resumes skipped every limit; 30 unread ones exhausted a 512 MB dyno."""
    answers = [ask(two_resumes, auth, requests_mock, answer_of(3)) for _ in range(3)]
    held = [resume(two_resumes, auth, ids[0], buffered=False) for ids in answers[:2]]
    assert [r.status_code for r in held] == [200, 200]

    refused = resume(two_resumes, auth, answers[2][0])

    assert refused.status_code == 429
    assert refused.json["code"] == "too_many_resumes"
    held[0].close()
    assert resume(two_resumes, auth, answers[2][0]).status_code == 200


def test_a_client_that_reconnects_to_the_same_answer_is_never_refused(
    two_resumes, auth, requests_mock
):
    """An EventSource whose previous connection died unnoticed comes back with a newer id: its
    new resume replaces the old one instead of counting twice."""
    ids = ask(two_resumes, auth, requests_mock, answer_of(5))
    old = [resume(two_resumes, auth, ids[n], buffered=False) for n in range(4)]
    assert [r.status_code for r in old] == [200] * 4
    assert resume(two_resumes, auth, ids[4], buffered=False).status_code == 200


# --- the spool sweep --------------------------------------------------------------------------


def test_the_sweep_deletes_only_the_proxys_own_old_records(tmp_path):
    """M2: pointed at a directory of other files, the sweep deleted every file older than the
    window: a .env, a database, a symlink, anything."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    stream_id = "A" * 22
    others = {
        ".env": "DIFY_API_KEY=app-x",
        "app.py": "print()",
        "data.db": "x",
        "B" * 21: "not quite an id",
    }
    for name, text in others.items():
        (spool / name).write_text(text)
    (spool / "C").write_text("x")
    (spool / "bindings").mkdir()
    (spool / "bindings" / ("D" * 22)).write_text("a binding of another helper's")
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    (spool / ("E" * 22)).symlink_to(outside)
    (spool / stream_id).write_text("an old record")
    (spool / f"{stream_id}.seen").write_text("")
    old = time.time() - 3600
    for path in spool.rglob("*"):
        os.utime(path, (old, old), follow_symlinks=False)
    os.utime(outside, (old, old))

    answers = Answers(str(spool), window=60, max_bytes=1000)
    answers._sweep()

    left = sorted(p.relative_to(spool).as_posix() for p in spool.rglob("*"))
    assert left == sorted([*others, "C", "bindings", f"bindings/{'D' * 22}", "E" * 22])
    assert outside.read_text() == "keep me"


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o1777])
def test_a_spool_directory_others_can_open_is_refused_at_start(tmp_path, mode):
    """M2: an existing 0777 spool directory was used as it was."""
    spool = tmp_path / "open"
    spool.mkdir()
    spool.chmod(mode)
    with pytest.raises(Exception, match="RESUME_SPOOL_DIR") as raised:
        Answers(str(spool), window=60, max_bytes=1000)
    assert "chmod 700" in str(raised.value)


def test_a_new_spool_directory_is_made_private(tmp_path):
    Answers(str(tmp_path / "new"), window=60, max_bytes=1000)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_records_go_once_their_window_is_over_even_if_no_answer_follows(tmp_path, monkeypatch):
    """L6: records outlived the window until the next answer on that worker swept."""
    monkeypatch.setattr(answers_module, "SWEEP_EVERY_SECONDS", 0.05)
    answers = Answers(str(tmp_path / "spool"), window=0.2, max_bytes=1000)
    answers.record("A" * 22, OWNER).end("completed")
    record = Path(answers.spool_path("A" * 22))
    deadline = time.monotonic() + 10
    while record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not record.exists()
