"""Redis URLs to redis-py clients, shared by the Redis broker and the Redis result backend.

Accepted URLs (Celery's forms)::

    redis://[[user]:password@]host[:port][/db][?option=value...]
    rediss://...?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem   (TLS)
    redis+socket:///path/to/redis.sock[?virtual_host=db]            (Unix socket)
    sentinel://[:password@]host:port[/db];sentinel://host2:port2    (with master_name)

Options come from the URL query and from transport options (which win). Clients speak
RESP2, as Celery's do, so pub/sub and client-tracking messages arrive as plain replies.
Passwords never appear in a message: errors name the URL through ``redact_url``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.sentinel import Sentinel

import redis
from conveyor.errors import ConfigurationError, ConveyorError
from conveyor.urls import redact_url

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # the redis extra installs it; without it, redis-py packs
    _hiredis_pack = None

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

# Commands never block in Redis (fetch waits on its own listener), so a reply slower than
# this means a dead peer; the worker then reconnects with backoff.
DEFAULT_SOCKET_TIMEOUT = 15.0
DEFAULT_CONNECT_TIMEOUT = 4.0
DEFAULT_HEALTH_CHECK_INTERVAL = 25.0

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
}
_SSL_OPTIONS = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
    "ssl_ca_path",
    "ssl_password",
)
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
_INT_OPTIONS = ("max_connections",)
CONNECTION_OPTIONS = frozenset(
    {
        *_SSL_OPTIONS,
        *_FLOAT_OPTIONS,
        *_INT_OPTIONS,
        "ssl",
        "socket_keepalive",
        "username",
        "password",
        "client_name",
        "master_name",
        "sentinel_kwargs",
        "virtual_host",
        "db",
    }
)
"""Options this module reads; the broker and backend read the rest."""


class RawConnection(Protocol):
    """The part of a redis-py connection the pub/sub listeners use directly."""

    def send_command(self, *args: Any, **kwargs: Any) -> None: ...
    def read_response(self, *args: Any, **kwargs: Any) -> Any: ...
    def can_read(self, timeout: float = 0) -> bool: ...
    def disconnect(self, *args: Any) -> None: ...


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@dataclass(frozen=True)
class RedisTarget:
    """Where to connect, parsed from a URL: one server, a Unix socket, or Sentinels."""

    url: str
    db: int = 0
    host: str = "localhost"
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    username: str | None = None
    password: str | None = None
    query: Mapping[str, str] = field(default_factory=dict)

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)


def parse_url(url: str) -> RedisTarget:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sentinel":
        return _parse_sentinel(url)
    if scheme not in {"redis", "rediss", "redis+socket"}:
        raise ConfigurationError(
            f"not a Redis URL: {redact_url(url)!r} (use redis://, rediss://, "
            "redis+socket:// or sentinel://)"
        )
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme == "redis+socket":
        path = unquote(parts.path)
        if not path or path == "/":
            raise ConfigurationError(
                f"{redact_url(url)!r} names no socket (redis+socket:///path/to/redis.sock)"
            )
        db = query.pop("virtual_host", query.pop("db", "0"))
        return RedisTarget(
            url, _db(db, url), socket_path=path, username=username, password=password, query=query
        )
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigurationError(f"bad port in {redact_url(url)!r}: {exc}") from None
    return RedisTarget(
        url,
        _db(parts.path.strip("/") or query.pop("db", "0"), url),
        host=parts.hostname or "localhost",
        port=port,
        tls=scheme == "rediss",
        username=username,
        password=password,
        query=query,
    )


def _parse_sentinel(url: str) -> RedisTarget:
    sentinels: list[tuple[str, int]] = []
    password: str | None = None
    username: str | None = None
    db = 0
    query: dict[str, str] = {}
    for raw_piece in url.split(";"):
        piece = raw_piece.strip()
        if not piece:
            continue
        if not piece.lower().startswith("sentinel://"):
            raise ConfigurationError(
                f"{redact_url(url)!r}: separate Sentinels with ';sentinel://host:port'"
            )
        parts = urlsplit(piece)
        try:
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError as exc:
            raise ConfigurationError(f"bad port in {redact_url(url)!r}: {exc}") from None
        if not parts.hostname:
            raise ConfigurationError(f"{redact_url(url)!r}: a Sentinel needs a host")
        sentinels.append((parts.hostname, port))
        if parts.password is not None and password is None:
            password = unquote(parts.password)
            username = unquote(parts.username) if parts.username else None
        if parts.path.strip("/"):
            db = _db(parts.path.strip("/"), url)
        query.update(parse_qsl(parts.query))
    if not sentinels:
        raise ConfigurationError(f"{redact_url(url)!r} names no Sentinel")
    return RedisTarget(
        url, db, sentinels=tuple(sentinels), username=username, password=password, query=query
    )


def _db(value: str, url: str) -> int:
    try:
        db = int(value)
    except ValueError:
        raise ConfigurationError(
            f"database in {redact_url(url)!r} must be a number, not {value!r}"
        ) from None
    if db < 0:
        raise ConfigurationError(f"database in {redact_url(url)!r} must not be negative")
    return db


def _number(name: str, value: Any, kind: type[float] | type[int], url: str) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"option {name}={value!r} for {redact_url(url)!r} must be a number"
        ) from None


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def _tls_options(target: RedisTarget, options: Mapping[str, Any]) -> dict[str, Any]:
    given: dict[str, Any] = {k: v for k, v in target.query.items() if k in _SSL_OPTIONS}
    nested = options.get("ssl")
    if isinstance(nested, Mapping):
        given.update(nested)
    given.update({k: v for k, v in options.items() if k in _SSL_OPTIONS})
    kwargs: dict[str, Any] = {}
    for name, value in given.items():
        if name == "ssl_cert_reqs" and isinstance(value, str):
            reqs = _CERT_REQS.get(value.strip().lower())
            if reqs is None:
                raise ConfigurationError(f"ssl_cert_reqs={value!r}: use required, optional or none")
            kwargs[name] = reqs
        elif name == "ssl_check_hostname":
            kwargs[name] = _flag(value)
        else:
            kwargs[name] = value
    return kwargs


def connection_kwargs(target: RedisTarget, options: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for redis-py connections to ``target``."""
    merged: dict[str, Any] = {k: v for k, v in target.query.items() if k in CONNECTION_OPTIONS}
    merged.update({k: v for k, v in options.items() if k in CONNECTION_OPTIONS})
    kwargs: dict[str, Any] = {
        "db": target.db,
        "protocol": 2,
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
        "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": DEFAULT_HEALTH_CHECK_INTERVAL,
        # One quick retry covers a pooled connection that went stale (server restart);
        # longer outages surface as BrokerUnavailable and the caller backs off.
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    for name in _FLOAT_OPTIONS:
        if name in merged:
            kwargs[name] = _number(name, merged[name], float, target.url)
    if "socket_keepalive" in merged:
        kwargs["socket_keepalive"] = _flag(merged["socket_keepalive"])
    if merged.get("client_name"):
        kwargs["client_name"] = str(merged["client_name"])
    username = merged.get("username", target.username)
    password = merged.get("password", target.password)
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if target.socket_path is not None:
        kwargs["path"] = target.socket_path
        kwargs.pop("socket_keepalive")  # a TCP option
    else:
        kwargs["host"], kwargs["port"] = target.host, target.port
    if target.tls or (target.sentinels and _flag(merged.get("ssl", False))):
        kwargs["ssl"] = True
        kwargs.update(_tls_options(target, options))
    return kwargs


class RedisClients:
    """The redis-py client for one URL, plus dedicated connections for listeners."""

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        self.target = parse_url(url)
        self._sentinel: object | None = None
        kwargs = connection_kwargs(self.target, options)
        max_connections = options.get("max_connections", self.target.query.get("max_connections"))
        pool_kwargs: dict[str, Any] = {}
        if max_connections is not None:
            pool_kwargs["max_connections"] = _number("max_connections", max_connections, int, url)
        if self.target.sentinels:
            master = options.get("master_name", self.target.query.get("master_name"))
            if not master:
                raise ConfigurationError(
                    f"{self.target.safe_url!r}: a Sentinel URL needs the master_name "
                    "transport option (the name Sentinel monitors)"
                )
            sentinel_kwargs = {
                "protocol": 2,
                "socket_timeout": kwargs["socket_timeout"],
                "socket_connect_timeout": kwargs["socket_connect_timeout"],
                # A Sentinel that is down is skipped for the next one, not retried.
                "retry": Retry(NoBackoff(), 0),
                **dict(options.get("sentinel_kwargs") or {}),
            }
            kwargs.pop("host", None)
            kwargs.pop("port", None)
            sentinel: Any = cast(Any, Sentinel)(
                list(self.target.sentinels), sentinel_kwargs=sentinel_kwargs
            )
            self._sentinel = sentinel
            self.client: redis.Redis = sentinel.master_for(str(master), **kwargs, **pool_kwargs)
        else:
            if "path" in kwargs:
                kwargs["connection_class"] = redis.UnixDomainSocketConnection
            elif kwargs.pop("ssl", False):
                kwargs["connection_class"] = redis.SSLConnection
            pool = redis.ConnectionPool(**kwargs, **pool_kwargs)
            self.client = redis.Redis(connection_pool=pool)

    @property
    def db(self) -> int:
        return self.target.db

    def dedicated(self) -> RawConnection:
        """A connection of the client's pool kept out of circulation (give it back
        with :meth:`give_back`): listeners subscribe on it."""
        return cast(RawConnection, self.client.connection_pool.get_connection())

    def give_back(self, connection: RawConnection) -> None:
        try:
            connection.disconnect()
        finally:
            self.client.connection_pool.release(cast(Any, connection))

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()
        if self._sentinel is not None:
            for sentinel in cast(Any, self._sentinel).sentinels:
                sentinel.close()
                sentinel.connection_pool.disconnect()


@contextmanager
def translated(
    unavailable: type[ConveyorError], failure: type[ConveyorError], where: str
) -> Iterator[None]:
    """Turn redis-py errors into Conveyor's: unreachable or failed, naming ``where``."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
        raise unavailable(f"Redis at {where} is unavailable: {exc}") from exc
    except redis.ResponseError as exc:
        if str(exc).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")):
            raise unavailable(f"Redis at {where} is not ready: {exc}") from exc
        raise failure(f"Redis at {where} refused a command: {exc}") from exc
    except redis.RedisError as exc:
        raise failure(f"Redis at {where} failed: {exc}") from exc



_NOT_SENT = object()


def send(connection: Any, *commands: tuple[Any, ...]) -> None:
    """``connection.send_command(*args)`` for each command (named in one word), packed
    by hiredis in one call each and written together. redis-py's packer first walks the
    arguments in Python: about 5 µs more for a fetch script's twenty, on every fetch,
    publish and stored result."""
    if _hiredis_pack is not None:
        try:
            if len(commands) == 1:
                packed = _hiredis_pack(commands[0])
            else:
                packed = b"".join([_hiredis_pack(command) for command in commands])
        except TypeError:
            pass  # redis-py's packer names what it cannot send
        else:
            connection.send_packed_command([packed])
            return
    connection.send_packed_command(connection.pack_commands(commands))


def _short_road(client: Any, args: tuple[Any, ...]) -> Any:
    """Send one command on a pooled connection and read its reply as Redis sent it (no
    response callback); ``_NOT_SENT`` if the connection failed (it is dropped)."""
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except (redis.ConnectionError, redis.TimeoutError):
        return _NOT_SENT
    try:
        send(connection, args)
        return connection.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        connection.disconnect()  # half a reply may be left on it
        return _NOT_SENT
    finally:
        pool.release(connection)


def run_command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)`` by the short road when all goes well, for
    commands whose reply needs no response callback (LPUSH, INCR...).

    redis-py's way there (``execute_command``, its retry wrapper, the callbacks) cost
    about 20 µs more than the round trip itself in a microbenchmark on the reference
    machine. A connection that fails takes the usual road, with its retry."""
    reply = _short_road(client, args)
    return cast(Any, client).execute_command(*args) if reply is _NOT_SENT else reply


def transaction_in_parts(
    client: redis.Redis, parts: Iterable[Sequence[Sequence[Any]]]
) -> list[Any] | None:
    """Run the commands of ``parts`` as one MULTI/EXEC transaction, writing each part as
    soon as ``parts`` makes it; returns EXEC's replies, or None if the connection failed
    (the caller then takes the usual road, with its retry).

    Redis reads and parses one part while the next is being made, where a pipeline is
    made whole before its first byte goes out, then waits for Redis to read it all. It
    runs nothing before EXEC: an error while a part is made (a message that cannot be
    written) drops the connection, and with it everything written so far."""
    pool: Any = client.connection_pool
    try:
        connection: Any = pool.get_connection()
    except (redis.ConnectionError, redis.TimeoutError):
        return None
    try:
        connection.send_packed_command(connection.pack_command("MULTI"))
        queued = 0
        for commands in parts:
            if commands:
                connection.send_packed_command(connection.pack_commands(commands),
                                               check_health=False)
                queued += len(commands)
        connection.send_packed_command(connection.pack_command("EXEC"), check_health=False)
        for _ in range(queued + 1):
            connection.read_response()  # MULTI's OK, then QUEUED for each command
        replies = connection.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        connection.disconnect()
        return None
    except BaseException:
        connection.disconnect()  # Redis forgets a transaction whose client went away
        raise
    finally:
        pool.release(connection)
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply
    return list(replies)


def run_script(script: Any, keys: list[Any], args: list[Any]) -> Any:
    """``script(keys=keys, args=args)`` for a script registered with
    ``register_script``, by the short road when all goes well.

    redis-py's way there (``Script.__call__`` on top of ``execute_command``) cost about
    40 µs more than the EVALSHA itself, and the worker runs a script per fetch, per batch
    of acks and per stored result. A script Redis does not have yet, or a connection
    that fails, takes the usual road, with its loading and its retry."""
    try:
        reply = _short_road(
            script.registered_client, ("EVALSHA", script.sha, len(keys), *keys, *args)
        )
    except NoScriptError:
        reply = _NOT_SENT
    return script(keys=keys, args=args) if reply is _NOT_SENT else reply
