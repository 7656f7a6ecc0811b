"""conveyor.serialization: kombu-compatible codecs, the accept-list and compression."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
import uuid
import zlib
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from kombu import compression as kombu_compression
from kombu import serialization as kombu_serialization
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from conveyor.errors import ConfigurationError, ContentDisallowed, DecodeError, EncodeError
from conveyor.serialization import (
    compress,
    content_type_of,
    decompress,
    dumps,
    loads,
    normalize_accept,
    register,
    registered_names,
)
from conveyor.serialization import registry as registry_module

JSON = "application/json"
MSGPACK = "application/x-msgpack"
YAML = "application/x-yaml"
PICKLE = "application/x-python-serialize"
ALL_TYPES = frozenset({JSON, MSGPACK, YAML, PICKLE})

PLUS_TWO = timezone(timedelta(hours=2))

TAGGED_VALUES: dict[str, Any] = {
    "naive datetime": datetime(2024, 2, 29, 12, 34, 56, 789),
    "aware datetime": datetime(2024, 2, 29, 12, 34, 56, 789, tzinfo=PLUS_TWO),
    "utc datetime": datetime(2026, 11, 23, 18, 54, 30, 708801, tzinfo=UTC),
    "whole-second datetime": datetime(2024, 1, 1, 0, 0, 0),
    "date": date(2024, 2, 29),
    "time": time(12, 34, 56, 789),
    "decimal": Decimal("1234.5678"),
    "decimal with trailing zeros": Decimal("1.50"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "utf-8 bytes": "héllo".encode(),
    "binary bytes": b"\xff\x00\xfe",
}


def roundtrip(value: Any, serializer: str) -> Any:
    body, content_type, content_encoding = dumps(value, serializer)
    return loads(body, content_type, content_encoding, ALL_TYPES)


# -- JSON: kombu's exact bytes ----------------------------------------------------------


def test_json_body_is_byte_for_byte_kombus() -> None:
    body = [
        [2, 3],
        {"z": "héllo"},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]

    assert dumps(body, "json") == (
        b'[[2, 3], {"z": "h\\u00e9llo"}, '
        b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
        "application/json",
        "utf-8",
    )


def test_json_escapes_astral_characters_as_surrogate_pairs() -> None:
    assert dumps(["\U0001f600"], "json")[0] == b'["\\ud83d\\ude00"]'


@pytest.mark.parametrize("name", sorted(TAGGED_VALUES))
def test_json_tagged_value_matches_kombu_bytes(name: str) -> None:
    value = {"value": TAGGED_VALUES[name], "list": [TAGGED_VALUES[name]]}

    assert dumps(value, "json")[0] == kombu_dumps(value).encode()


@pytest.mark.parametrize(
    ("value", "envelope"),
    [
        (datetime(2024, 2, 29, 1, 2, 3, tzinfo=PLUS_TWO), "2024-02-29T01:02:03+02:00"),
        (date(2024, 2, 29), "2024-02-29"),
        (time(12, 34, 56, 789), "12:34:56.000789"),
        (Decimal("1234.5678"), "1234.5678"),
        (uuid.UUID(int=0x1234), {"hex": "00000000000000000000000000001234"}),
        (b"text", "text"),
        (b"\xff", "/w=="),
    ],
)
def test_json_tagged_envelope_form(value: Any, envelope: Any) -> None:
    (tagged,) = json.loads(dumps([value], "json")[0])

    assert tagged["__value__"] == envelope
    assert set(tagged) == {"__type__", "__value__"}


def test_json_bytes_tag_depends_on_utf8_validity() -> None:
    assert json.loads(dumps(b"ok", "json")[0])["__type__"] == "bytes"
    assert json.loads(dumps(b"\xff", "json")[0])["__type__"] == "base64"


# -- JSON: round trips and cross-checks with kombu --------------------------------------


@pytest.mark.parametrize("name", sorted(TAGGED_VALUES))
def test_json_round_trips_tagged_value(name: str) -> None:
    value = TAGGED_VALUES[name]

    decoded = roundtrip({"nested": [value]}, "json")

    assert decoded == {"nested": [value]}
    assert type(decoded["nested"][0]) is type(value)


def test_json_keeps_datetime_offset() -> None:
    value = datetime(2024, 2, 29, 12, 0, tzinfo=PLUS_TWO)

    assert roundtrip(value, "json").utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize("name", sorted(TAGGED_VALUES))
def test_kombu_decodes_our_json(name: str) -> None:
    value = TAGGED_VALUES[name]

    assert kombu_loads(dumps([value], "json")[0]) == [value]


@pytest.mark.parametrize("name", sorted(TAGGED_VALUES))
def test_we_decode_kombus_json(name: str) -> None:
    value = TAGGED_VALUES[name]
    body = kombu_dumps({"v": value}).encode()

    assert loads(body, JSON, "utf-8", frozenset({JSON})) == {"v": value}


def test_json_turns_tuples_into_arrays() -> None:
    assert dumps(((1, 2), {"t": ("a",)}), "json")[0] == b'[[1, 2], {"t": ["a"]}]'


def test_json_encodes_dict_subclasses_as_objects() -> None:
    class Signature(dict[str, Any]):
        pass

    assert dumps(Signature(task="add", args=[1]), "json")[0] == b'{"task": "add", "args": [1]}'


def test_json_uses_dunder_json() -> None:
    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

        def __json__(self) -> dict[str, Any]:
            return {"x": self.x, "y": self.y, "at": date(2024, 1, 1)}

    body = dumps([Point(1, 2)], "json")[0]

    assert body == kombu_dumps([Point(1, 2)]).encode()
    assert roundtrip([Point(1, 2)], "json") == [{"x": 1, "y": 2, "at": date(2024, 1, 1)}]


def test_json_tags_subclasses_of_tagged_types() -> None:
    class MyDecimal(Decimal):
        pass

    assert roundtrip(MyDecimal("2.5"), "json") == Decimal("2.5")


def test_json_reader_accepts_compact_and_raw_utf8() -> None:
    body = '[[2,3],{"z":"héllo"},{"callbacks":null}]'.encode()

    assert loads(body, JSON, "utf-8", frozenset({JSON})) == [
        [2, 3],
        {"z": "héllo"},
        {"callbacks": None},
    ]


def test_json_leaves_objects_that_only_look_tagged_alone() -> None:
    value = {"__type__": "datetime", "__value__": "x", "extra": 1}

    assert roundtrip(value, "json") == value
    assert roundtrip({"__type__": "anything"}, "json") == {"__type__": "anything"}


def test_json_body_in_another_charset_is_transcoded() -> None:
    body = '{"z": "héllo"}'.encode("utf-16")

    assert loads(body, JSON, "utf-16", frozenset({JSON})) == {"z": "héllo"}


# -- JSON: errors ------------------------------------------------------------------------


def test_json_set_raises_encode_error_naming_the_type() -> None:
    with pytest.raises(EncodeError, match=r"json cannot encode an object of type 'set'.*list"):
        dumps({"ids": {1, 2}}, "json")


def test_json_arbitrary_object_raises_encode_error_naming_the_type() -> None:
    class Widget:
        pass

    with pytest.raises(EncodeError, match=r"type '.*Widget'.*__json__") as caught:
        dumps([Widget()], "json")
    assert not isinstance(caught.value, TypeError)


def test_json_unsupported_key_raises_encode_error() -> None:
    with pytest.raises(EncodeError, match="keys must be"):
        dumps({(1, 2): "tuple key"}, "json")


def test_json_circular_reference_raises_encode_error() -> None:
    loop: list[Any] = []
    loop.append(loop)

    with pytest.raises(EncodeError, match="json cannot encode"):
        dumps(loop, "json")


def test_json_unknown_type_tag_raises_decode_error() -> None:
    body = b'{"__type__": "frobnicator", "__value__": 1}'

    with pytest.raises(DecodeError, match="frobnicator"):
        loads(body, JSON, "utf-8", frozenset({JSON}))


def test_json_malformed_tagged_value_raises_decode_error() -> None:
    body = b'{"__type__": "decimal", "__value__": "not a number"}'

    with pytest.raises(DecodeError, match="decimal"):
        loads(body, JSON, "utf-8", frozenset({JSON}))


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00garbage", b"{not json", b"", b"[1, 2"])
def test_json_garbage_raises_decode_error_naming_the_content_type(garbage: bytes) -> None:
    with pytest.raises(DecodeError, match="application/json") as caught:
        loads(garbage, JSON, "utf-8", frozenset({JSON}))
    assert caught.value.__cause__ is not None


def test_unknown_charset_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        loads(b"{}", JSON, "no-such-charset", frozenset({JSON}))


# -- msgpack, yaml, pickle ---------------------------------------------------------------

PLAIN_VALUE = [[2, 3], {"z": "héllo", "n": None, "f": 1.5, "ok": True}, {"callbacks": None}]


@pytest.mark.parametrize("serializer", ["json", "msgpack", "yaml", "pickle"])
def test_every_codec_round_trips_plain_data(serializer: str) -> None:
    assert roundtrip(PLAIN_VALUE, serializer) == PLAIN_VALUE


@pytest.mark.parametrize(
    ("serializer", "content_type", "content_encoding"),
    [
        ("json", JSON, "utf-8"),
        ("msgpack", MSGPACK, "binary"),
        ("yaml", YAML, "utf-8"),
        ("pickle", PICKLE, "binary"),
    ],
)
def test_codec_content_types_match_kombu(
    serializer: str, content_type: str, content_encoding: str
) -> None:
    assert dumps(1, serializer)[1:] == (content_type, content_encoding)
    assert dumps(1, content_type)[1:] == (content_type, content_encoding)
    assert content_type_of(serializer) == (content_type, content_encoding)
    assert content_type_of(content_type) == (content_type, content_encoding)


@pytest.mark.parametrize("name", sorted(TAGGED_VALUES))
def test_msgpack_round_trips_tagged_value(name: str) -> None:
    value = TAGGED_VALUES[name]

    decoded = roundtrip({"v": (value,)}, "msgpack")

    assert decoded == {"v": [value]}
    assert type(decoded["v"][0]) is type(value)


def test_msgpack_writes_bytes_natively() -> None:
    import msgpack

    body = dumps(b"\xff\x00", "msgpack")[0]

    assert msgpack.unpackb(body, raw=False) == b"\xff\x00"


def test_msgpack_interoperates_with_kombu() -> None:
    body, content_type, content_encoding = dumps(PLAIN_VALUE, "msgpack")
    assert kombu_serialization.loads(body, content_type, content_encoding, accept=[MSGPACK]) == (
        PLAIN_VALUE
    )

    content_type, content_encoding, body = kombu_serialization.dumps(PLAIN_VALUE, "msgpack")
    assert loads(body, content_type, content_encoding, frozenset({MSGPACK})) == PLAIN_VALUE


def test_msgpack_unsupported_type_raises_encode_error() -> None:
    with pytest.raises(EncodeError, match="msgpack cannot encode an object of type 'object'"):
        dumps(object(), "msgpack")


def test_msgpack_garbage_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="application/x-msgpack"):
        loads(b"\xc1", MSGPACK, "binary", frozenset({MSGPACK}))


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 2, 29, 12, 34, 56, 789),
        datetime(2024, 2, 29, 12, 34, 56, tzinfo=PLUS_TWO),
        date(2024, 2, 29),
        b"\xff\x00",
        {"set": {1, 2}},
    ],
)
def test_yaml_round_trips_its_native_types(value: Any) -> None:
    assert roundtrip(value, "yaml") == value


def test_yaml_interoperates_with_kombu() -> None:
    body, content_type, content_encoding = dumps(PLAIN_VALUE, "yaml")
    assert kombu_serialization.loads(body, content_type, content_encoding, accept=[YAML]) == (
        PLAIN_VALUE
    )

    content_type, content_encoding, body = kombu_serialization.dumps(PLAIN_VALUE, "yaml")
    assert loads(body.encode(), content_type, content_encoding, frozenset({YAML})) == PLAIN_VALUE


def test_yaml_uses_safe_loading() -> None:
    body = b"!!python/object/apply:os.system ['true']"

    with pytest.raises(DecodeError, match="application/x-yaml"):
        loads(body, YAML, "utf-8", frozenset({YAML}))


def test_yaml_unsupported_type_raises_encode_error() -> None:
    with pytest.raises(EncodeError, match="yaml cannot encode an object of type 'object'"):
        dumps([object()], "yaml")


@pytest.mark.parametrize("name", sorted(TAGGED_VALUES))
def test_pickle_round_trips_tagged_value(name: str) -> None:
    assert roundtrip(TAGGED_VALUES[name], "pickle") == TAGGED_VALUES[name]


def test_pickle_decodes_kombus_pickle_when_accepted() -> None:
    content_type, content_encoding, body = kombu_serialization.dumps({"a": {1, 2}}, "pickle")

    assert loads(body, content_type, content_encoding, normalize_accept(["pickle"])) == {
        "a": {1, 2}
    }


def test_pickle_garbage_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="application/x-python-serialize"):
        loads(b"not a pickle", PICKLE, "binary", frozenset({PICKLE}))


def test_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "msgpack", None)  # makes ``import msgpack`` fail

    with pytest.raises(ConfigurationError, match=r"pip install 'conveyor\[msgpack\]'"):
        dumps([1], "msgpack")
    with pytest.raises(ConfigurationError, match=r"pip install 'conveyor\[msgpack\]'"):
        loads(b"\x91\x01", MSGPACK, "binary", frozenset({MSGPACK}))


# -- the accept-list ---------------------------------------------------------------------


def test_pickle_refused_unless_accepted() -> None:
    body, content_type, content_encoding = dumps({"x": 1}, "pickle")

    with pytest.raises(ContentDisallowed, match=r"x-python-serialize.*pickle.*accept_content"):
        loads(body, content_type, content_encoding, normalize_accept(["json"]))

    assert loads(body, content_type, content_encoding, normalize_accept(["json", "pickle"])) == {
        "x": 1
    }


def test_content_disallowed_lists_the_accepted_types() -> None:
    with pytest.raises(ContentDisallowed, match=r"\['application/json'\]"):
        loads(b"- 1\n", YAML, "utf-8", normalize_accept(["json"]))


def test_content_disallowed_before_decoding() -> None:
    with pytest.raises(ContentDisallowed):
        loads(b"garbage", PICKLE, "binary", frozenset())


def test_normalize_accept_maps_names_and_content_types() -> None:
    assert normalize_accept(["json", "application/x-yaml", "msgpack"]) == {JSON, YAML, MSGPACK}
    assert normalize_accept(["json", JSON]) == {JSON}
    assert normalize_accept([]) == frozenset()


def test_normalize_accept_takes_a_single_name() -> None:
    assert normalize_accept("json") == {JSON}


def test_normalize_accept_never_adds_pickle_implicitly() -> None:
    assert PICKLE not in normalize_accept(["json", "msgpack", "yaml"])


def test_normalize_accept_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"'jsn'.*json.*msgpack.*pickle.*yaml"):
        normalize_accept(["json", "jsn"])


def test_unknown_serializer_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="json"):
        dumps([1], "protobuf")
    with pytest.raises(ConfigurationError):
        content_type_of("application/protobuf")


def test_accepted_type_without_codec_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="application/unknown"):
        loads(b"x", "application/unknown", "utf-8", frozenset({"application/unknown"}))


# -- registering codecs ------------------------------------------------------------------


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register codecs without leaking them into other tests."""
    monkeypatch.setattr(registry_module, "_BY_NAME", dict(registry_module._BY_NAME))
    monkeypatch.setattr(registry_module, "_BY_CONTENT_TYPE", dict(registry_module._BY_CONTENT_TYPE))


@pytest.mark.usefixtures("scratch_registry")
def test_register_adds_a_codec() -> None:
    register("upper", "text/x-upper", "utf-8", lambda obj: str(obj).upper().encode(), bytes.decode)

    assert registered_names() == ["json", "msgpack", "pickle", "upper", "yaml"]
    assert dumps("abc", "upper") == (b"ABC", "text/x-upper", "utf-8")
    assert normalize_accept(["upper"]) == {"text/x-upper"}
    assert loads(b"ABC", "text/x-upper", "utf-8", frozenset({"text/x-upper"})) == "ABC"


@pytest.mark.usefixtures("scratch_registry")
def test_register_replaces_a_codec_of_the_same_name() -> None:
    register("json", "application/x-other-json", "utf-8", lambda obj: b"{}", lambda data: {})

    assert content_type_of("json") == ("application/x-other-json", "utf-8")
    with pytest.raises(ConfigurationError):
        content_type_of(JSON)


def test_registered_names_lists_the_builtins() -> None:
    assert registered_names() == ["json", "msgpack", "pickle", "yaml"]


# -- compression -------------------------------------------------------------------------

PAYLOAD = b'[[2, 3], {"z": "h\\u00e9llo"}, {}]' * 50


@pytest.mark.parametrize(
    ("codec", "mime"),
    [
        ("gzip", "application/x-gzip"),
        ("zlib", "application/x-gzip"),
        ("bzip2", "application/x-bz2"),
        ("lzma", "application/x-lzma"),
        ("xz", "application/x-lzma"),
        ("application/x-gzip", "application/x-gzip"),
        ("application/x-bz2", "application/x-bz2"),
        ("application/x-lzma", "application/x-lzma"),
    ],
)
def test_compression_round_trips(codec: str, mime: str) -> None:
    compressed, header = compress(PAYLOAD, codec)

    assert header == mime
    assert len(compressed) < len(PAYLOAD)
    assert decompress(compressed, header) == PAYLOAD
    assert decompress(compressed, codec) == PAYLOAD


def test_gzip_output_is_zlib_format_like_kombu() -> None:
    compressed, _ = compress(PAYLOAD, "gzip")

    assert zlib.decompress(compressed) == PAYLOAD
    assert compressed == kombu_compression.compress(PAYLOAD, "gzip")[0]


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "lzma"])
def test_compression_interoperates_with_kombu(codec: str) -> None:
    compressed, mime = compress(PAYLOAD, codec)
    assert kombu_compression.decompress(compressed, mime) == PAYLOAD

    kombu_compressed, kombu_mime = kombu_compression.compress(PAYLOAD, codec)
    assert kombu_mime == mime
    assert decompress(kombu_compressed, kombu_mime) == PAYLOAD


def test_decompress_also_reads_real_gzip() -> None:
    assert decompress(gzip.compress(PAYLOAD), "application/x-gzip") == PAYLOAD


def test_decompress_reads_legacy_lzma_and_bz2() -> None:
    assert decompress(lzma.compress(PAYLOAD, format=lzma.FORMAT_ALONE), "xz") == PAYLOAD
    assert decompress(bz2.compress(PAYLOAD), "application/x-bz2") == PAYLOAD


@pytest.mark.parametrize("mime", ["application/x-gzip", "application/x-bz2", "application/x-lzma"])
def test_corrupt_compressed_body_raises_decode_error(mime: str) -> None:
    with pytest.raises(DecodeError, match=mime):
        decompress(b"definitely not compressed", mime)


def test_brotli_is_not_supported() -> None:
    with pytest.raises(DecodeError, match="not supported"):
        decompress(b"\x0b\x02\x80hello\x03", "application/x-brotli")
    with pytest.raises(ConfigurationError, match="not supported"):
        compress(PAYLOAD, "brotli")


def test_zstd_works_only_with_stdlib_support() -> None:
    if sys.version_info >= (3, 14):
        compressed, mime = compress(PAYLOAD, "zstd")
        assert mime == "application/zstd"
        assert decompress(compressed, mime) == PAYLOAD
    else:
        with pytest.raises(DecodeError, match=r"not supported.*3\.14"):
            decompress(b"\x28\xb5\x2f\xfd", "application/zstd")


def test_unknown_compression_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match=r"'snappy'.*gzip"):
        compress(PAYLOAD, "snappy")
    with pytest.raises(DecodeError, match=r"'application/x-snappy'.*gzip"):
        decompress(PAYLOAD, "application/x-snappy")
