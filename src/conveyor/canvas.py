"""Signatures and workflows: chain, group, chord, map, starmap, chunks.

A :class:`Signature` is a dict in Celery's wire form (PROTOCOL.md 1.5): ``task``,
``args``, ``kwargs``, ``options``, ``subtask_type``, ``immutable``; so it travels inside
messages (``embed``) exactly as Celery's does, and a Celery producer's canvas runs here.

How each workflow is sent (PROTOCOL.md 1.6):

* ``chain(a, b, c)`` publishes ``a`` only; ``b`` and ``c`` ride in ``embed.chain``,
  reversed, each frozen with its task id so the chain's result is known up front.
* ``group(...)`` publishes every member with a shared ``group`` id and its
  ``group_index``.
* ``chord(header)(body)`` is a group whose members carry the body in ``embed.chord``; the
  backend counts finished parts atomically and the part that completes the header sends
  the body, with the results in header order. A backend that cannot count gets Celery's
  ``celery.chord_unlock`` task instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConfigurationError
from conveyor.protocol import new_id
from conveyor.result import AsyncResult, GroupResult
from conveyor.task import CALL_OPTIONS

if TYPE_CHECKING:
    from conveyor.app import Conveyor

ResultLike = AsyncResult[Any] | GroupResult

_COMPOSITES = frozenset({"chain", "group", "chunks", "chord"})
"""Kinds of signature that :func:`signature` makes into their own classes."""

# Options that only describe where a signature sits in a workflow; they are dropped when
# a signature is copied into a new position.
_POSITION_OPTIONS = ("task_id", "group_id", "group_index", "chord", "chain", "parent_id",
                     "root_id")


_dict_init = dict.__init__


class Signature(dict[str, Any]):
    """A task call that can be sent later, composed, or carried inside a message."""

    # No instance dict: a group of a thousand calls makes a thousand signatures.
    __slots__ = ("app",)

    def __init__(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Conveyor | None = None,
    ) -> None:
        _dict_init(self, task=task, args=list(args), kwargs=dict(kwargs) if kwargs else {},
                   options=dict(options) if options else {}, subtask_type=subtask_type,
                   immutable=immutable)
        self.app = app

    # -- the wire fields ------------------------------------------------------------------
    @property
    def task(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self["kwargs"])

    @property
    def options(self) -> dict[str, Any]:
        return self["options"]  # type: ignore[no-any-return]

    @property
    def immutable(self) -> bool:
        return bool(self.get("immutable"))

    @property
    def id(self) -> str | None:
        value = self.options.get("task_id")
        return None if value is None else str(value)

    def __repr__(self) -> str:
        args = ", ".join([*map(repr, self.args),
                          *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task}({args}){'!' if self.immutable else ''}"

    def _require_app(self) -> Conveyor:
        if self.app is None:
            raise ConfigurationError(f"signature {self!r} is not bound to an app")
        return self.app

    # -- building -------------------------------------------------------------------------
    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        """A copy with ``args`` prepended (unless immutable) and options merged."""
        kind = self.get("subtask_type")
        if type(self) is Signature and kind not in _COMPOSITES:
            # What the general way below gives a plain signature, with fewer copies.
            immutable = bool(self.get("immutable"))
            base_args = self.get("args") or ()
            base_kwargs = self.get("kwargs") or {}
            base_options = self.get("options") or {}
            return Signature(
                str(self["task"]),
                base_args if immutable or not args else [*args, *base_args],
                base_kwargs if immutable or not kwargs else {**base_kwargs, **kwargs},
                {**base_options, **options} if options else base_options,
                subtask_type=kind,
                immutable=immutable,
                app=self.app,
            )
        copy = signature(dict(self), self.app)
        if not copy.immutable:
            copy["args"] = [*args, *copy.args]
            copy["kwargs"] = {**copy.kwargs, **(kwargs or {})}
        copy["options"] = {**copy.options, **options}
        return copy

    def set(self, **options: Any) -> Signature:
        """Set call options on this signature (``queue=``, ``countdown=``, ...)."""
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = immutable

    def link(self, callback: Signature) -> Signature:
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Signature) -> Signature:
        self.options.setdefault("link_error", []).append(errback)
        return errback

    def freeze(self, _id: str | None = None) -> ResultLike:
        """Fix the task id now, so the result is known before anything is sent."""
        options = self.options
        if options.get("task_id") is None:
            options["task_id"] = _id or new_id()
        return AsyncResult(str(options["task_id"]), self._require_app())

    def __or__(self, other: Signature) -> chain:  # type: ignore[override]
        return chain(self, other)

    # -- sending --------------------------------------------------------------------------
    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> ResultLike:
        app = self._require_app()
        call = self.clone(args, kwargs, **options)
        return app.send_task(call.task, call.args, call.kwargs, **_send_options(call.options))

    def delay(self, *args: Any, **kwargs: Any) -> ResultLike:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task locally, here and now, like calling the function."""
        from conveyor.request import Request

        task = self._require_app().get_task(self.task)
        call = self.clone(args, kwargs)
        return task.run_with(Request(called_directly=True), call.args, call.kwargs)


def _send_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key in CALL_OPTIONS}


class chain(Signature):  # noqa: N801 - Celery's name, used as a function
    """Run tasks one after another, each receiving the previous result."""

    def __init__(self, *tasks: Signature | Iterable[Signature], app: Conveyor | None = None,
                 **options: Any) -> None:
        steps = _flatten_chain(tasks)
        super().__init__("celery.chain", (), {"tasks": steps}, options, subtask_type="chain",
                         app=app or _first_app(steps))

    @property
    def tasks(self) -> list[Signature]:
        return [signature(step, self.app) for step in self.kwargs["tasks"]]

    @property
    def id(self) -> str | None:
        """A chain's result is its last step's."""
        steps = self.kwargs["tasks"]
        return signature(steps[-1], self.app).id if steps else None

    def __or__(self, other: Signature) -> chain:  # type: ignore[override]
        return chain(*self.tasks, other, app=self.app)

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        steps = self.tasks
        if steps and (args or kwargs):
            steps[0] = steps[0].clone(args, kwargs)
        return chain(*steps, app=self.app, **{**self.options, **options})

    def _steps(self) -> list[Signature]:
        """The steps, with each group followed by a step upgraded to a chord."""
        steps = self.tasks
        result: list[Signature] = []
        index = 0
        while index < len(steps):
            step = steps[index]
            if isinstance(step, group) and index + 1 < len(steps):
                result.append(chord(step.tasks, steps[index + 1], app=self.app,
                                    **step.options))
                index += 2
                continue
            result.append(step)
            index += 1
        return result

    def freeze(self, _id: str | None = None) -> ResultLike:
        steps = self._steps()
        self["kwargs"]["tasks"] = steps
        parent: ResultLike | None = None
        last: ResultLike | None = None
        for position, step in enumerate(steps):
            is_last = position == len(steps) - 1
            last = step.freeze(_id if is_last else None)
            if parent is not None and isinstance(last, AsyncResult):
                last.parent = parent
            parent = last
        if last is None:
            raise ConfigurationError("an empty chain has nothing to run")
        return last

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> ResultLike:
        call = self.clone(args, kwargs, **options)
        assert isinstance(call, chain)
        result = call.freeze(options.get("task_id"))
        steps = call.kwargs["tasks"]
        first, rest = signature(steps[0], self.app), [signature(s, self.app) for s in steps[1:]]
        membership = {key: call.options[key] for key in MEMBERSHIP
                      if call.options.get(key) is not None}
        if membership:
            attach_membership(rest[-1] if rest else first, membership)
        outer = {k: v for k, v in call.options.items() if k not in (*MEMBERSHIP, "task_id")}
        if rest:
            outer["chain"] = [*reversed(rest)]
        first.options.update(outer)
        first.apply_async()
        return result


class group(Signature):  # noqa: N801 - Celery's name, used as a function
    """Run tasks in parallel; their results come back as one list, in order."""

    def __init__(self, *tasks: Signature | Iterable[Signature], app: Conveyor | None = None,
                 **options: Any) -> None:
        members = _flatten_args(tasks)
        if len(members) == 1 and isinstance(members[0], group):
            members = members[0].tasks  # group(group(...)) is the inner group
        super().__init__("celery.group", (), {"tasks": members}, options,
                         subtask_type="group", app=app or _first_app(members))

    @property
    def tasks(self) -> list[Signature]:
        app = self.app
        # signature(member, app), without the call for members bound to the app already
        return [member if isinstance(member, Signature) and (app is None or member.app is app)
                else signature(member, app) for member in self["kwargs"]["tasks"]]

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        members = [member.clone(args, kwargs) for member in self.tasks]
        return group(members, app=self.app, **{**self.options, **options})

    def freeze(self, _id: str | None = None) -> GroupResult:
        group_id = self.options.get("group_id") or _id or new_id()
        self.options["group_id"] = group_id
        results = [member.freeze() for member in self.tasks_frozen()]
        return GroupResult(str(group_id), results, self._require_app())

    def tasks_frozen(self) -> list[Signature]:
        members = self.tasks
        self["kwargs"]["tasks"] = members
        return members

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> GroupResult:
        app = self._require_app()
        members = self["kwargs"]["tasks"]
        if not args and not kwargs and all(map(_is_plain, members)):
            # Task calls alone, nothing to prepend: what clone() and freeze() below come
            # to, without copying the members (send_members leaves them as they were).
            merged = {**self.options, **options}
            group_id = str(merged.get("group_id") or new_id())
            ids = send_members(members, group_id, merged, app)
            return GroupResult(group_id, [AsyncResult(str(i), app) for i in ids], app)
        call = self.clone(args, kwargs, **options)
        assert isinstance(call, group)
        result = call.freeze(options.get("group_id"))
        send_members(call.tasks, result.id, call.options, app)
        return result


class chord(Signature):  # noqa: N801 - Celery's name, used as a function
    """A group whose results, once all are in, go to one more task (the body)."""

    def __init__(self, header: Signature | Iterable[Signature],
                 body: Signature | None = None, app: Conveyor | None = None,
                 **options: Any) -> None:
        members: list[Signature] = []
        for member in _flatten_args([header]):
            # A group in a header adds its members to the header: one flat result list.
            members.extend(member.tasks if isinstance(member, group) else [member])
        super().__init__("celery.chord", (),
                         {"header": members, "body": body, "kwargs": {}}, options,
                         subtask_type="chord", app=app or _first_app(members) or (
                             body.app if body is not None else None))

    @property
    def id(self) -> str | None:
        """A chord's result is its body's."""
        body = self.kwargs.get("body")
        return None if body is None else signature(body, self.app).id

    @property
    def header(self) -> group:
        return group(self.kwargs["header"], app=self.app)

    @property
    def body(self) -> Signature:
        body = self.kwargs.get("body")
        if body is None:
            raise ConfigurationError("a chord needs a body: chord(header)(body)")
        return signature(body, self.app)

    def __call__(self, body: Signature | None = None, **options: Any) -> Any:
        if body is not None:
            return chord(self.header.tasks, body, app=self.app,
                         **self.options).apply_async(**options)
        return self.apply_async(**options)

    def clone(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        header = [member.clone(args, kwargs) for member in self.header.tasks]
        return chord(header, self.body, app=self.app, **{**self.options, **options})

    def freeze(self, _id: str | None = None) -> ResultLike:
        group_id = self.options.get("group_id") or new_id()
        self.options["group_id"] = group_id
        body = self.body
        body.options.setdefault("group_id", group_id)
        result = body.freeze(_id)
        self["kwargs"]["body"] = body
        header = group(self.kwargs["header"], app=self.app, group_id=group_id)
        header_result = header.freeze()
        self["kwargs"]["header"] = header.kwargs["tasks"]
        if isinstance(result, AsyncResult):
            result.parent = header_result
        return result

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> ResultLike:
        app = self._require_app()
        call = self.clone(args, kwargs, **options)
        assert isinstance(call, chord)
        result = call.freeze(options.get("task_id"))
        group_id = str(call.options["group_id"])
        header = call.header.tasks
        body = call.body
        # A chord inside a chain carries the rest of the chain on to its body.
        for key in ("chain", "link", "link_error"):
            if call.options.get(key):
                body.options[key] = call.options[key]
        if not header:
            body.apply_async(([],))
            return result
        member_ids = [str(member.id) for member in header]
        backend = app.backend
        if backend is None:
            raise ConfigurationError("chords need a result backend to collect the header")
        body_dict = dict(body)
        body_dict["chord_size"] = len(header)
        if not backend.prepare_chord(group_id, member_ids):
            app.send_task("celery.chord_unlock", (group_id, body_dict), {
                "interval": 1.0, "max_retries": None,
                "result": [[[member_id, None], None] for member_id in member_ids],
            }, countdown=1, queue=body.options.get("queue"))
        shared = {k: v for k, v in call.options.items()
                  if k in ("queue", "priority", "expires", "countdown", "eta")}
        send_members(header, group_id, {**shared, "chord": body_dict}, app)
        return result


def send_members(members: Sequence[Signature], group_id: str, options: Mapping[str, Any],
                 app: Conveyor) -> list[str]:
    """Send a group's or a chord header's members: plain task calls together in one
    broker operation, composite ones (chains, chords, groups) each on its own. Returns
    the task ids of the plain ones, in order; one without an id gets a new one (its
    signature is left as it was)."""
    shared = {k: v for k, v in options.items() if k not in (*MEMBERSHIP, "task_id")}
    body = options.get("chord")
    if body is None:
        name = _bare_calls_task(members)
        if name is not None:
            sent = app.send_group_calls(name, members, group_id, shared)
            if sent is not None:
                return sent
    plain: list[tuple[str, Sequence[Any], Mapping[str, Any], Mapping[str, Any]]] = []
    ids: list[str] = []
    for index, member in enumerate(members):
        if _is_plain(member):
            # What attach_membership() and member.clone(**shared).apply_async() do, without
            # the copy; the shared options are applied over these by send_calls.
            own = member["options"]
            if own:
                task_id = own.get("task_id")
                if task_id is None:
                    task_id = new_id()
                call = {**own, "task_id": task_id, "group_id": group_id, "group_index": index}
            else:  # the usual member, ``task.s(...)``: no option to check
                task_id = new_id()
                call = {"task_id": task_id, "group_id": group_id, "group_index": index}
            ids.append(task_id)
            if body is not None:
                call["chord"] = body
            if own and not call.keys() <= CALL_OPTIONS:
                call = _send_options(call)
            plain.append((member["task"], member["args"] or (), member["kwargs"], call))
            continue
        if not isinstance(member, group):  # a nested group keeps its own id and indexes
            membership: dict[str, Any] = {"group_id": group_id, "group_index": index}
            if body is not None:
                membership["chord"] = body
            attach_membership(member, membership)
        member.apply_async(**shared)
    if plain:
        app.send_calls(plain, shared)
    return ids


def _bare_calls_task(members: Sequence[Signature]) -> str | None:
    """The task of ``members`` if they are all plain calls of one task with no options
    of their own (a group of ``task.s(...)``), else None."""
    name = members[0].get("task") if members else None
    if type(name) is not str:
        return None
    for member in members:
        if not (type(member) is Signature and member["task"] == name
                and not member["options"] and member.get("subtask_type") is None):
            return None
    return name


def _is_plain(member: Any) -> bool:
    """A task call, not a composite (chain, chord, group) that sends itself."""
    return type(member) is Signature and member.get("subtask_type") not in _COMPOSITES


MEMBERSHIP = ("group_id", "group_index", "chord")
"""Options that make a task a member of a group or chord header."""


def attach_membership(sig: Signature, membership: Mapping[str, Any]) -> None:
    """Make ``sig`` report as a group/chord member from the task that ends it: a chain
    from its last step, a chord from its body, anything else from itself."""
    if isinstance(sig, chord):
        body = sig.body
        attach_membership(body, membership)
        sig["kwargs"]["body"] = body
    elif isinstance(sig, chain):
        steps = sig.tasks
        attach_membership(steps[-1], membership)
        sig["kwargs"]["tasks"] = steps
    else:
        sig.options.update(membership)


def _first_app(items: Sequence[Mapping[str, Any]]) -> Conveyor | None:
    for item in items:
        app = getattr(item, "app", None)
        if app is not None:
            return app  # type: ignore[no-any-return]
    return None


def _flatten_args(items: Iterable[Any]) -> list[Signature]:
    flat: list[Signature] = []
    for item in items:
        if isinstance(item, Signature):
            flat.append(item)  # what signature(item) returns
        elif isinstance(item, Mapping):
            flat.append(signature(item, getattr(item, "app", None)))
        else:
            flat.extend(_flatten_args(item))
    return flat


def _flatten_chain(items: Iterable[Any]) -> list[Signature]:
    flat: list[Signature] = []
    for step in _flatten_args(items):
        if isinstance(step, chain):
            flat.extend(step.tasks)
        else:
            flat.append(step)
    return flat


def signature(value: Mapping[str, Any], app: Conveyor | None = None) -> Signature:
    """A signature object from its dict form (as found in messages), of the right kind."""
    if isinstance(value, Signature) and (app is None or value.app is app):
        return value
    bound = app if app is not None else getattr(value, "app", None)
    kind = value.get("subtask_type")
    kwargs = dict(value.get("kwargs") or {})
    options = dict(value.get("options") or {})
    if kind == "chain":
        return chain(kwargs.get("tasks", []), app=bound, **options)
    if kind == "group":
        return group(kwargs.get("tasks", []), app=bound, **options)
    if kind == "chunks":
        return chunks(signature(kwargs["task"], bound), kwargs.get("it", []),
                      int(kwargs.get("n", 1)), app=bound, **options)
    if kind == "chord":
        body = kwargs.get("body")
        return chord(kwargs.get("header", []),
                     signature(body, bound) if body is not None else None, app=bound,
                     **options)
    return Signature(str(value["task"]), value.get("args") or (), kwargs, options,
                     subtask_type=kind, immutable=bool(value.get("immutable")), app=bound)


def _chunked(items: Iterable[Any], size: int) -> list[list[Any]]:
    iterator = iter(items)
    out: list[list[Any]] = []
    while batch := list(itertools.islice(iterator, size)):
        out.append(batch)
    return out


class xmap(Signature):  # noqa: N801 - Celery's name
    """One ``celery.map`` task calling ``task`` on each item (``add.map(...)``)."""

    def __init__(self, task: Signature, items: Iterable[Any], app: Conveyor | None = None,
                 **options: Any) -> None:
        super().__init__("celery.map", (), {"task": task, "it": list(items)}, options,
                         immutable=True, app=app or task.app)


class xstarmap(Signature):  # noqa: N801 - Celery's name
    """One ``celery.starmap`` task calling ``task(*args)`` for each args tuple."""

    def __init__(self, task: Signature, items: Iterable[Sequence[Any]],
                 app: Conveyor | None = None, **options: Any) -> None:
        super().__init__("celery.starmap", (), {"task": task, "it": [list(i) for i in items]},
                         options, immutable=True, app=app or task.app)


class chunks(Signature):  # noqa: N801 - Celery's name
    """Many calls split into tasks of ``n`` calls each: a group of ``xstarmap``."""

    def __init__(self, task: Signature, items: Iterable[Sequence[Any]], n: int,
                 app: Conveyor | None = None, **options: Any) -> None:
        if n < 1:
            raise ConfigurationError("chunks need a size of at least 1")
        super().__init__("celery.chunks", (),
                         {"task": task, "it": [list(i) for i in items], "n": n}, options,
                         subtask_type="chunks", immutable=True, app=app or task.app)

    def group(self) -> group:
        task = signature(self.kwargs["task"], self.app)
        parts = [xstarmap(task, part, app=self.app) for part in
                 _chunked(self.kwargs["it"], int(self.kwargs["n"]))]
        return group(parts, app=self.app, **self.options)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> GroupResult:
        return self.group().apply_async(args, kwargs, **options)
