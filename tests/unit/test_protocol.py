"""Protocol v2 as Celery writes it, checked against messages captured from Celery 5.7."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conveyor import protocol, serialization
from conveyor.envelope import Envelope
from conveyor.errors import ContentDisallowed, EncodeError, MessageError
from conveyor.protocol import Embed, TaskHeaders, TaskMessage

# Copies of the team's Celery 5 captures (shared/celery-captures), kept with the tests so a
# clone anywhere checks against them.
CAPTURES = Path(__file__).resolve().parents[1] / "captures"
JSON = serialization.normalize_accept(["json"])


def envelope_from_kombu(raw: str) -> Envelope:
    data = json.loads(raw)
    return Envelope(
        body=base64.b64decode(data["body"]),
        content_type=data["content-type"],
        content_encoding=data["content-encoding"],
        headers=data["headers"],
        properties=data["properties"],
    )


def captured_envelopes(name: str) -> list[Envelope]:
    path = CAPTURES / name
    found = []
    for raw_line in path.read_text().splitlines():
        line = raw_line.strip()
        if line.startswith('"envelope_raw": '):
            found.append(envelope_from_kombu(json.loads(line[len('"envelope_raw": '):-1])))
        elif line.startswith("ENVELOPE: "):
            found.append(envelope_from_kombu(line[len("ENVELOPE: "):]))
    assert found, f"no envelopes in {name}"
    return found


def test_celery_captured_messages_decode() -> None:
    envelopes = captured_envelopes("redis_tasks.txt")
    for envelope in envelopes:
        headers = protocol.read_headers(envelope, JSON)
        args, kwargs, embed = protocol.decode_body(envelope, JSON)
        assert headers.task.startswith("interop.")
        assert headers.id == envelope.properties["correlation_id"]
        assert isinstance(args, list)
        assert isinstance(kwargs, dict)
        assert isinstance(embed, Embed)
    embeds = [protocol.decode_body(envelope, JSON)[2] for envelope in envelopes]
    linked = [embed for embed in embeds if embed.callbacks]
    assert linked[0].callbacks is not None
    assert linked[0].callbacks[0]["task"] == "interop.add"
    assert linked[0].errbacks is not None
    chained = [embed for embed in embeds if embed.chain]
    assert chained
    assert chained[0].chain is not None
    assert chained[0].chain[-1]["task"] == "interop.add"  # next step is the last element


def test_protocol_v1_capture_is_read() -> None:
    envelope = captured_envelopes("redis_protocol_v1.txt")[0]
    headers = protocol.read_headers(envelope, JSON)
    assert headers.protocol == 1
    assert headers.task == "interop.add"
    assert headers.eta is not None
    assert headers.eta.tzinfo is not None
    args, kwargs, _ = protocol.decode_body(envelope, JSON, protocol=1)
    assert args == [2, 3]
    assert kwargs == {}


def make_message(**header_fields: object) -> TaskMessage:
    fields: dict[str, object] = {"id": "6acbc035-8c09-4fed-b5c4-68cfd5a4784a",
                                 "task": "interop.add"}
    fields.update(header_fields)
    return TaskMessage(headers=TaskHeaders(**fields),  # type: ignore[arg-type]
                       args=[2, 3], kwargs={"z": "héllo"}, reply_to="oid")


def test_encoded_message_matches_celery_layout() -> None:
    eta = datetime(2026, 11, 23, 18, 57, 41, 411867, tzinfo=UTC)
    message = make_message(eta=eta, time_limit=30.0, soft_time_limit=20.0,
                           extra={"x-interop": "yes"})
    envelope = protocol.encode_task(message)
    assert envelope.body == (b'[[2, 3], {"z": "h\\u00e9llo"}, {"callbacks": null, '
                             b'"errbacks": null, "chain": null, "chord": null}]')
    assert envelope.content_type == "application/json"
    assert envelope.content_encoding == "utf-8"
    expected_keys = ["lang", "task", "id", "shadow", "eta", "expires", "group",
                     "group_index", "retries", "timelimit", "root_id", "parent_id",
                     "argsrepr", "kwargsrepr", "origin", "ignore_result",
                     "replaced_task_nesting", "stamped_headers", "stamps", "x-interop"]
    assert list(envelope.headers) == expected_keys
    assert envelope.headers["eta"] == "2026-11-23T18:57:41.411867+00:00"
    assert envelope.headers["timelimit"] == [30.0, 20.0]  # hard first, as Celery's code
    assert envelope.headers["root_id"] == message.id
    assert envelope.headers["argsrepr"] == "(2, 3)"
    assert envelope.headers["kwargsrepr"] == "{'z': 'héllo'}"
    assert envelope.properties["correlation_id"] == message.id
    assert envelope.properties["reply_to"] == "oid"
    assert envelope.properties["delivery_mode"] == 2
    assert envelope.properties["priority"] == 0
    assert "expiration" not in envelope.properties


def test_expires_sets_amqp_expiration_in_milliseconds() -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    envelope = protocol.encode_task(make_message(expires=expires))
    left = int(envelope.properties["expiration"])
    assert 3_590_000 < left <= 3_600_000
    past = protocol.encode_task(make_message(expires=datetime.now(UTC) - timedelta(seconds=5)))
    assert past.properties["expiration"] == "0"


def test_round_trip_keeps_every_header() -> None:
    message = make_message(retries=2, group="g", group_index=1, parent_id="p",
                           root_id="r", shadow="nick", ignore_result=True)
    envelope = protocol.encode_task(message)
    headers = protocol.read_headers(envelope, JSON)
    assert (headers.retries, headers.group, headers.group_index) == (2, "g", 1)
    assert (headers.parent_id, headers.root_id, headers.shadow) == ("p", "r", "nick")
    assert headers.ignore_result is True


def test_argsrepr_is_truncated() -> None:
    message = TaskMessage(headers=TaskHeaders(id="i", task="t"), args=["x" * 5000])
    envelope = protocol.encode_task(message)
    assert len(envelope.headers["argsrepr"]) == protocol.REPR_LIMIT


def test_compressed_body_round_trips() -> None:
    envelope = protocol.encode_task(make_message(), compression="gzip")
    assert envelope.headers["compression"] == "application/x-gzip"
    args, kwargs, _ = protocol.decode_body(envelope, JSON)
    assert (args, kwargs) == ([2, 3], {"z": "héllo"})


def test_unencodable_argument_fails_at_encode() -> None:
    message = TaskMessage(headers=TaskHeaders(id="i", task="t"), args=[object()])
    with pytest.raises(EncodeError, match="object"):
        protocol.encode_task(message)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[1, 2]", "3-element"),
        (b'[{"a": 1}, {}, null]', "args must be an array"),
        (b"[[], [], null]", "kwargs must be an object"),
        (b'"text"', "3-element"),
        (b'[[], {}, "embed"]', "embed must be a mapping"),
    ],
)
def test_malformed_bodies_are_message_errors(body: bytes, reason: str) -> None:
    envelope = Envelope(body, "application/json", "utf-8", {"task": "t", "id": "i"})
    with pytest.raises(MessageError, match=reason):
        protocol.decode_body(envelope, JSON)


def test_headers_without_task_or_id_are_refused() -> None:
    no_id = Envelope(b"[[], {}, null]", "application/json", "utf-8", {"task": "t"})
    with pytest.raises(MessageError, match="no task id"):
        protocol.read_headers(no_id, JSON)
    not_a_task = Envelope(b'{"hello": 1}', "application/json", "utf-8", {})
    with pytest.raises(MessageError, match="unknown message"):
        protocol.read_headers(not_a_task, JSON)


def test_bad_eta_is_a_message_error() -> None:
    envelope = Envelope(b"[[], {}, null]", "application/json", "utf-8",
                        {"task": "t", "id": "i", "eta": "tomorrow"})
    with pytest.raises(MessageError, match="eta"):
        protocol.read_headers(envelope, JSON)


def test_naive_eta_is_utc() -> None:
    envelope = Envelope(b"[[], {}, null]", "application/json", "utf-8",
                        {"task": "t", "id": "i", "eta": "2030-01-01T00:00:00"})
    headers = protocol.read_headers(envelope, JSON)
    assert headers.eta == datetime(2030, 1, 1, tzinfo=UTC)


def test_pickle_body_refused_unless_accepted() -> None:
    message = make_message()
    envelope = protocol.encode_task(message, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        protocol.decode_body(envelope, JSON)
    accept = serialization.normalize_accept(["json", "pickle"])
    assert protocol.decode_body(envelope, accept)[0] == [2, 3]


def test_origin_names_the_process_that_sends_even_after_a_fork() -> None:
    import os
    import socket

    assert protocol.origin_name() == f"gen{os.getpid()}@{socket.gethostname()}"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports the origin its messages would carry
        os.write(write_end, protocol.origin_name().encode())
        os._exit(0)
    os.close(write_end)
    child_origin = os.read(read_end, 200).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child_origin == f"gen{pid}@{socket.gethostname()}"


def test_new_ids_are_random_uuid4_texts() -> None:
    import uuid

    ids = [protocol.new_id() for _ in range(1000)]  # several batches
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every place that is random takes many values: none is copied from a fixed one.
    for place in range(36):
        seen = {text[place] for text in ids}
        if place in (8, 13, 18, 23):
            assert seen == {"-"}
        elif place == 14:
            assert seen == {"4"}
        elif place == 19:
            assert seen == set("89ab")
        else:
            assert len(seen) == 16, place


def test_a_forked_child_never_sends_its_parents_next_ids() -> None:
    import os

    protocol.new_id()  # the parent now holds a batch it has not used
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, " ".join(protocol.new_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write_end)
    child_ids = os.read(read_end, 1000).decode().split()
    os.close(read_end)
    os.waitpid(pid, 0)
    parent_ids = [protocol.new_id() for _ in range(5)]
    assert len(child_ids) == 5
    assert not set(child_ids) & set(parent_ids)


def test_headers_of_unusual_types_read_as_celery_writes_them() -> None:
    from types import MappingProxyType

    headers = MappingProxyType({
        "task": "t", "id": "i", "group": 7, "group_index": 2, "root_id": 5,
        "parent_id": None, "shadow": "s", "origin": b"o", "argsrepr": 1, "kwargsrepr": None,
        "timelimit": (3, None), "retries": 2.0, "ignore_result": 1, "eta": "",
        "stamps": MappingProxyType({"a": 1}), "replaced_task_nesting": None, "custom": [1],
    })
    envelope = Envelope(b'[[1], {"k": 2}, null]', "application/json", "utf-8", headers)
    read = protocol.read_headers(envelope, JSON)
    assert (read.group, read.group_index, read.root_id, read.parent_id, read.shadow,
            read.origin, read.argsrepr, read.kwargsrepr) == (
        "7", 2, "5", None, "s", "b'o'", "1", None)
    assert (read.time_limit, read.soft_time_limit, read.retries, read.eta) == (
        3.0, None, 2, None)
    assert read.ignore_result is None  # only a real boolean says it
    assert read.stamps == {"a": 1}
    assert type(read.stamps) is dict
    assert read.extra == {"custom": [1]}
    assert protocol.decode_body(envelope, JSON)[:2] == ([1], {"k": 2})


def test_a_v1_taskset_names_the_group_only_where_group_is_missing() -> None:
    def group_of(headers: dict[str, object]) -> str | None:
        envelope = Envelope(b"[[], {}, null]", "application/json", "utf-8",
                            {"task": "t", "id": "i", **headers})
        return protocol.read_headers(envelope, JSON).group

    assert group_of({"taskset": "ts"}) == "ts"
    assert group_of({"group": "g", "taskset": "ts"}) == "g"
    assert group_of({"group": None, "taskset": "ts"}) is None
