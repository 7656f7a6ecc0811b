"""Celery's result document and its exception encoding (``conveyor.backends.meta``)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from conveyor import errors, states
from conveyor.backends.meta import build_meta, decode_exception, encode_exception


class InventoryError(Exception):
    """A user's exception, importable from this module."""


class Outer:
    class NestedError(Exception):
        pass


class NeedsTwoArguments(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)


def round_trip(exc: BaseException) -> BaseException:
    return decode_exception(encode_exception(exc))


# -- encoding -------------------------------------------------------------------------------
def test_builtin_exception_encodes_as_celery_does() -> None:
    assert encode_exception(ValueError("boom ✗")) == {
        "exc_type": "ValueError",
        "exc_message": ["boom ✗"],
        "exc_module": "builtins",
    }


def test_arguments_are_made_serializable() -> None:
    encoded = encode_exception(InventoryError("custom", 42, (1, 2), {"k": object}, None))
    assert encoded["exc_message"] == ["custom", 42, [1, 2], {"k": repr(object)}, None]


def test_conveyor_errors_are_filed_under_celery_modules() -> None:
    assert encode_exception(errors.TaskRevokedError("revoked"))["exc_module"] == (
        "celery.exceptions"
    )
    assert encode_exception(errors.TimeLimitExceeded(30.0))["exc_module"] == ("billiard.exceptions")
    assert encode_exception(errors.BackendError("down"))["exc_module"] == "conveyor.errors"


def test_nested_class_is_encoded_by_qualname() -> None:
    assert encode_exception(Outer.NestedError("deep"))["exc_type"] == "Outer.NestedError"


# -- decoding -------------------------------------------------------------------------------
def test_builtin_round_trip_keeps_type_and_unicode_message() -> None:
    exc = round_trip(ValueError("boom ✗ ünïcode"))
    assert type(exc) is ValueError
    assert exc.args == ("boom ✗ ünïcode",)


def test_custom_exception_comes_back_as_the_same_class() -> None:
    exc = round_trip(InventoryError("custom", 42))
    assert type(exc) is InventoryError
    assert exc.args == ("custom", 42)


def test_nested_custom_exception_comes_back_as_the_same_class() -> None:
    assert type(round_trip(Outer.NestedError("deep"))) is Outer.NestedError


def test_exception_with_another_constructor_keeps_its_args() -> None:
    exc = decode_exception(
        {"exc_type": "NeedsTwoArguments", "exc_message": ["only one"], "exc_module": __name__}
    )
    assert type(exc) is NeedsTwoArguments
    assert exc.args == ("only one",)


def test_unknown_module_gives_a_synthesized_exception_with_that_name() -> None:
    document = {
        "exc_type": "InteropError",
        "exc_message": ["custom", 42],
        "exc_module": "interop_app_not_installed",
    }
    exc = decode_exception(document)
    assert isinstance(exc, Exception)
    assert type(exc).__name__ == "InteropError"
    assert exc.args == ("custom", 42)
    # The same name rebuilds the same class, so ``except`` clauses can be reused.
    assert type(decode_exception(document)) is type(exc)
    assert encode_exception(exc) == document


def test_unknown_attribute_of_a_known_module_is_synthesized() -> None:
    exc = decode_exception({"exc_type": "NoSuchError", "exc_message": ["x"], "exc_module": "os"})
    assert isinstance(exc, Exception)
    assert type(exc).__name__ == "NoSuchError"


def test_modules_not_already_loaded_are_not_imported(tmp_path: Path) -> None:
    # A result document comes from whoever can write to the backend; importing the
    # module it names would run that module's code, so (like Celery) only modules
    # that are already loaded are looked in.
    module = "conveyor_test_import_side_effect"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass PlantedError(Exception):\n    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        exc = decode_exception(
            {"exc_type": "PlantedError", "exc_message": ["x"], "exc_module": module}
        )
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)
    assert not marker.exists()
    assert type(exc).__name__ == "PlantedError"


def test_single_message_that_is_not_a_list_is_the_only_argument() -> None:
    exc = decode_exception(
        {"exc_type": "KeyError", "exc_message": "gone", "exc_module": "builtins"}
    )
    assert type(exc) is KeyError
    assert exc.args == ("gone",)


def test_missing_module_means_builtins() -> None:
    exc = decode_exception({"exc_type": "RuntimeError", "exc_message": ["no module"]})
    assert type(exc) is RuntimeError


@pytest.mark.parametrize(
    ("name", "module", "expected"),
    [
        ("TaskRevokedError", "celery.exceptions", errors.TaskRevokedError),
        ("MaxRetriesExceededError", "celery.exceptions", errors.MaxRetriesExceededError),
        ("ChordError", "celery.exceptions", errors.ChordError),
        ("TimeLimitExceeded", "billiard.exceptions", errors.TimeLimitExceeded),
        ("SoftTimeLimitExceeded", "billiard.exceptions", errors.SoftTimeLimitExceeded),
        ("WorkerLostError", "billiard.exceptions", errors.WorkerLostError),
    ],
)
def test_celery_exceptions_come_back_as_conveyor_errors(
    name: str, module: str, expected: type[BaseException]
) -> None:
    exc = decode_exception({"exc_type": name, "exc_message": ["revoked"], "exc_module": module})
    assert type(exc) is expected
    assert exc.args == ("revoked",)


def test_conveyor_errors_round_trip_through_their_celery_names() -> None:
    assert type(round_trip(errors.TaskRevokedError("expired"))) is errors.TaskRevokedError
    assert type(round_trip(errors.TimeLimitExceeded(30.0))) is errors.TimeLimitExceeded


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "getcwd"), ("builtins", "eval"), ("os", "path"), ("builtins", "object")],
)
def test_refuses_to_build_something_that_is_not_an_exception(module: str, name: str) -> None:
    with pytest.raises(errors.ConveyorError, match="not an exception"):
        decode_exception({"exc_type": name, "exc_message": ["/"], "exc_module": module})


def test_unreadable_document_becomes_a_conveyor_error() -> None:
    assert isinstance(decode_exception("just text"), errors.ConveyorError)
    assert isinstance(decode_exception({"exc_message": ["no type"]}), errors.ConveyorError)


def test_an_exception_instance_passes_through() -> None:
    exc = ValueError("already built")
    assert decode_exception(exc) is exc


# -- Celery reads what we write -------------------------------------------------------------
@pytest.fixture
def celery_backend() -> Any:
    celery = pytest.importorskip("celery")
    from celery.backends.base import Backend  # type: ignore[import-untyped]

    app = celery.Celery("conveyor-meta-test", set_as_current=False)
    return Backend(app)


@pytest.mark.parametrize(
    "exc",
    [ValueError("boom ✗"), InventoryError("custom", 42), KeyError("k")],
    ids=["builtin", "custom", "keyerror"],
)
def test_celery_rebuilds_our_encoding(celery_backend: Any, exc: BaseException) -> None:
    rebuilt = celery_backend.exception_to_python(encode_exception(exc))
    assert type(rebuilt) is type(exc)
    assert rebuilt.args == exc.args


def test_celery_rebuilds_a_revocation_as_its_own_type(celery_backend: Any) -> None:
    from celery.exceptions import TaskRevokedError  # type: ignore[import-untyped]

    rebuilt = celery_backend.exception_to_python(
        encode_exception(errors.TaskRevokedError("revoked"))
    )
    assert isinstance(rebuilt, TaskRevokedError)
    assert rebuilt.args == ("revoked",)


def test_we_rebuild_celerys_encoding(celery_backend: Any) -> None:
    encoded = celery_backend.prepare_exception(InventoryError("custom", 42), "json")
    # Celery keeps the args tuple until the serializer turns it into a list.
    assert {**encoded, "exc_message": list(encoded["exc_message"])} == encode_exception(
        InventoryError("custom", 42)
    )
    assert type(decode_exception(encoded)) is InventoryError


# -- the document ---------------------------------------------------------------------------
def test_success_document_has_celerys_fields_in_order() -> None:
    meta = build_meta("6acbc035", states.SUCCESS, 5)
    assert list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == 5
    assert meta["traceback"] is None
    assert meta["children"] == []
    assert meta["task_id"] == "6acbc035"
    date_done = datetime.fromisoformat(meta["date_done"])
    assert date_done.utcoffset() is not None
    assert date_done.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert meta["date_done"].endswith("+00:00")


@pytest.mark.parametrize("status", [states.STARTED, states.RETRY])
def test_unready_documents_have_no_date_done(status: str) -> None:
    result: Any = {"pid": 1, "hostname": "w"} if status == states.STARTED else ValueError("x")
    assert build_meta("t", status, result)["date_done"] is None


@pytest.mark.parametrize("status", [states.FAILURE, states.RETRY, states.REVOKED])
def test_exception_states_store_the_encoded_exception(status: str) -> None:
    meta = build_meta("t", status, errors.TaskRevokedError("revoked"), traceback="Traceback ...")
    assert meta["result"] == {
        "exc_type": "TaskRevokedError",
        "exc_message": ["revoked"],
        "exc_module": "celery.exceptions",
    }
    assert meta["traceback"] == "Traceback ..."


def test_success_result_that_is_an_exception_is_left_alone() -> None:
    # Only exception states encode; a task may return an exception object as a value.
    value = ValueError("returned, not raised")
    assert build_meta("t", states.SUCCESS, value)["result"] is value


def test_children_are_kept() -> None:
    children = [[["975b0642-7630-4069-82ec-c02a18fe95b1", None], None]]
    assert build_meta("t", states.SUCCESS, 1, children=children)["children"] == children


REQUEST = {
    "task": "interop.add",
    "args": [2, 3],
    "kwargs": {},
    "hostname": "interop-celery@vm",
    "retries": 0,
    "delivery_info": {"routing_key": "celery", "exchange": ""},
    "group": "group-1",
    "parent_id": "parent-1",
}


def test_group_and_parent_are_added_when_known() -> None:
    meta = build_meta("t", states.SUCCESS, 5, request=REQUEST)
    assert list(meta) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "group_id",
        "parent_id",
        "task_id",
    ]
    assert (meta["group_id"], meta["parent_id"]) == ("group-1", "parent-1")


def test_group_and_parent_are_left_out_when_unknown() -> None:
    request = {**REQUEST, "group": None, "parent_id": None}
    meta = build_meta("t", states.SUCCESS, 5, request=request)
    assert "group_id" not in meta
    assert "parent_id" not in meta


def test_extended_document_matches_protocol_example() -> None:
    request = {**REQUEST, "group": None, "parent_id": None}
    meta = build_meta("t", states.SUCCESS, 5, request=request, extended=True)
    assert list(meta) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "name",
        "args",
        "kwargs",
        "worker",
        "retries",
        "queue",
        "task_id",
    ]
    assert {key: meta[key] for key in ("name", "args", "kwargs", "worker", "retries", "queue")} == {
        "name": "interop.add",
        "args": [2, 3],
        "kwargs": {},
        "worker": "interop-celery@vm",
        "retries": 0,
        "queue": "celery",
    }


def test_extended_fields_need_extended_mode() -> None:
    meta = build_meta("t", states.SUCCESS, 5, request=REQUEST)
    assert "name" not in meta
    assert "worker" not in meta


def test_extended_queue_is_none_without_delivery_info() -> None:
    request = {key: value for key, value in REQUEST.items() if key != "delivery_info"}
    assert build_meta("t", states.SUCCESS, 5, request=request, extended=True)["queue"] is None
