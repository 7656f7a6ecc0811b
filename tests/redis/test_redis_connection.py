"""Redis URLs: parsing, and real connections over TCP, a Unix socket, TLS and Sentinel
(each server private to its test)."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import pytest
from tests.redis.conftest import PrivateRedis, free_port

import redis
from conveyor import states
from conveyor.backends.meta import build_meta
from conveyor.backends.redis import RedisBackend
from conveyor.brokers.redis import RedisBroker
from conveyor.envelope import Envelope
from conveyor.errors import BrokerUnavailable, ConfigurationError
from conveyor.redis_connection import (
    RedisClients,
    connection_kwargs,
    parse_url,
    run_command,
    run_script,
    send,
)


def message(body: str) -> Envelope:
    return Envelope(body.encode(), "application/json", "utf-8", {"task": "t"}, {})


def round_trip(url: str, **options: object) -> None:
    """Publish, fetch and ack one message; store and wait for one result."""
    with RedisBroker(url, **options) as broker:  # type: ignore[arg-type]
        broker.publish(message("hello"), exchange="", routing_key="q")
        [delivery] = broker.fetch(["q"], 1, timeout=5)
        assert delivery.envelope.body == b"hello"
        broker.ack(delivery)
        assert broker.stats(["q"])[0].ready == 0
    with RedisBackend(url, **options) as backend:  # type: ignore[arg-type]
        backend.store("t-1", build_meta("t-1", states.SUCCESS, 42))
        assert backend.wait("t-1", timeout=5)["result"] == 42


# -- parsing ---------------------------------------------------------------------------------
def test_redis_url_parts() -> None:
    target = parse_url("redis://:s%40cret@example.com:6390/4?socket_timeout=2.5")
    assert (target.host, target.port, target.db, target.password) == (
        "example.com",
        6390,
        4,
        "s@cret",
    )
    assert not target.tls
    assert "s@cret" not in target.safe_url
    assert "s%40cret" not in target.safe_url
    kwargs = connection_kwargs(target, {"socket_connect_timeout": 1})
    assert kwargs["socket_timeout"] == 2.5
    assert kwargs["socket_connect_timeout"] == 1.0
    assert kwargs["protocol"] == 2
    assert parse_url("redis://localhost").db == 0


def test_user_and_password_and_defaults() -> None:
    target = parse_url("redis://app:pw@[::1]/2")
    assert (target.username, target.password, target.host, target.port, target.db) == (
        "app",
        "pw",
        "::1",
        6379,
        2,
    )


def test_rediss_url_carries_tls_options() -> None:
    target = parse_url(
        "rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=no"
    )
    kwargs = connection_kwargs(target, {})
    assert target.tls
    assert kwargs["ssl"] is True
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert kwargs["ssl_check_hostname"] is False
    options = {"ssl": {"ssl_cert_reqs": "none"}}
    assert connection_kwargs(parse_url("rediss://h/0"), options)["ssl_cert_reqs"] == ssl.CERT_NONE


def test_socket_and_sentinel_urls() -> None:
    socket = parse_url("redis+socket:///run/redis.sock?virtual_host=3")
    assert (socket.socket_path, socket.db) == ("/run/redis.sock", 3)
    assert connection_kwargs(socket, {})["path"] == "/run/redis.sock"
    sentinel = parse_url("sentinel://:pw@s1:26379/1;sentinel://s2:26380;sentinel://s3")
    assert sentinel.sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert (sentinel.db, sentinel.password) == (1, "pw")


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost",
        "redis://h/notanumber",
        "redis://h:99999/0",
        "redis+socket://",
        "rediss://h/0?ssl_cert_reqs=sometimes",
        "sentinel://",
        "sentinel://h;redis://x",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        connection_kwargs(parse_url(url), {})  # TLS options are checked here


def test_a_sentinel_url_needs_a_master_name() -> None:
    with pytest.raises(ConfigurationError, match="master_name"):
        RedisBroker("sentinel://127.0.0.1:1")


def test_an_unreachable_server_is_unavailable_and_the_password_is_not_shown() -> None:
    broker = RedisBroker(
        f"redis://:topsecret@127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5
    )
    try:
        with pytest.raises(BrokerUnavailable) as raised:
            broker.check()
        with pytest.raises(BrokerUnavailable):
            broker.fetch(["q"], 1, timeout=0)
    finally:
        broker.close()
    assert "topsecret" not in str(raised.value)
    assert "***" in str(raised.value)


# -- live connections ----------------------------------------------------------------------
def test_password_protected_server(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, "--requirepass", "s3cr3t pass")
    server.start()
    try:
        round_trip(f"redis://:s3cr3t%20pass@127.0.0.1:{server.port}/1")
        with pytest.raises(BrokerUnavailable):
            RedisBroker(f"redis://:wrong@127.0.0.1:{server.port}/1").check()
    finally:
        server.kill()


def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = PrivateRedis(tmp_path, "--unixsocket", str(path), "--unixsocketperm", "700")
    server.start()
    try:
        round_trip(f"redis+socket://{path}?virtual_host=2")
    finally:
        server.kill()


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=conveyor-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "server.crt",
    )
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


def test_tls_with_certificate_checks(tmp_path: Path) -> None:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca, cert, key = make_certificates(tmp_path)
    tls_port = free_port()
    server = PrivateRedis(
        tmp_path,
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(ca),
        "--tls-auth-clients",
        "no",
    )
    server.start()
    try:
        round_trip(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}")
        # The same through transport options, as Celery's broker_use_ssl would give them.
        round_trip(
            f"rediss://localhost:{tls_port}/0",
            ssl={"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)},
        )
        # A server whose certificate we cannot verify is refused.
        with pytest.raises(BrokerUnavailable):
            RedisBroker(
                f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required", socket_connect_timeout=2
            ).check()
    finally:
        server.kill()


def test_sentinel_finds_the_master(tmp_path: Path) -> None:
    master = PrivateRedis(tmp_path)
    master.start()
    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    sentinel_port = free_port()
    config = sentinel_dir / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor conveyor 127.0.0.1 {master.port} 1\n"
    )
    with (sentinel_dir / "sentinel.log").open("ab") as log:
        sentinel = subprocess.Popen(
            ["redis-server", str(config), "--sentinel"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=sentinel_dir,
        )
    try:
        url = f"sentinel://127.0.0.1:{free_port()};sentinel://127.0.0.1:{sentinel_port}"
        deadline = time.monotonic() + 10
        while True:  # until the Sentinel answers for its master
            try:
                RedisBroker(url, master_name="conveyor").check()
                break
            except BrokerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        round_trip(url, master_name="conveyor")
    finally:
        sentinel.kill()
        sentinel.wait(timeout=10)
        master.kill()


# -- scripts by the short road --------------------------------------------------------------
def test_run_script_answers_as_the_script_object_does(private_redis: PrivateRedis) -> None:
    client = redis.Redis.from_url(private_redis.url, protocol=2)
    try:
        script = client.register_script(
            "redis.call('SET', KEYS[1], ARGV[1]) "
            "return {redis.call('GET', KEYS[1]), tonumber(ARGV[2]), false, {ARGV[3]}}"
        )
        keys, args = ["k"], [b"v\x00", 7, "x"]
        assert run_script(script, keys, args) == script(keys=keys, args=args)
        assert run_script(script, keys, args) == [b"v\x00", 7, None, [b"x"]]
        failing = client.register_script("return redis.error_reply('NOPE it failed')")
        with pytest.raises(redis.ResponseError, match="NOPE it failed"):
            run_script(failing, [], [])
    finally:
        client.close()


def test_run_script_loads_a_script_redis_forgot(private_redis: PrivateRedis) -> None:
    client = redis.Redis.from_url(private_redis.url, protocol=2)
    try:
        script = client.register_script("return ARGV[1] + 1")
        assert run_script(script, [], [1]) == 2
        client.script_flush()  # as after a restart or a failover
        assert run_script(script, [], [41]) == 42
    finally:
        client.close()


def test_run_script_survives_a_connection_the_server_closed(
    private_redis: PrivateRedis,
) -> None:
    clients = RedisClients(private_redis.url, {})
    try:
        script = clients.client.register_script("return redis.call('INCR', KEYS[1])")
        assert run_script(script, ["n"], []) == 1
        private_redis.drop_clients()  # the pooled connection is now dead
        assert run_script(script, ["n"], []) == 2  # the usual road's retry reconnects
        assert run_script(script, ["n"], []) == 3
    finally:
        clients.close()


def test_run_command_answers_and_survives_a_connection_the_server_closed(
    private_redis: PrivateRedis,
) -> None:
    clients = RedisClients(private_redis.url, {})
    try:
        assert run_command(clients.client, "LPUSH", "l", b"a", b"b") == 2
        private_redis.drop_clients()
        assert run_command(clients.client, "LPUSH", "l", b"c") == 3
        assert clients.client.lrange("l", 0, -1) == [b"c", b"b", b"a"]
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            run_command(clients.client, "INCR", "l")
        private_redis.kill()  # down: no connection to be had, the usual error
        with pytest.raises(redis.ConnectionError):
            run_command(clients.client, "LPUSH", "l", b"d")
    finally:
        clients.close()


@pytest.mark.parametrize("args", [
    ("EVALSHA", "a" * 40, 2, "k1", "k\u00e9", "1795565008.7818334", 4, "ab12:", 1, 100, 1000),
    ("LPUSH", "q", b"\x00\xff" * 300, "{\"body\": \"\u2603\"}"),
    ("SET", "k", 1.5, -7, 2**70),
    ("GET", ""),
])
def test_send_writes_what_redis_pys_packer_writes(args: tuple[object, ...]) -> None:
    written: list[bytes] = []
    connection = redis.Connection()
    connection.send_packed_command = lambda command, check_health=True: written.extend(command)  # type: ignore[method-assign]
    send(connection, args)
    assert b"".join(written) == b"".join(connection.pack_command(*args))


def test_send_leaves_what_it_cannot_pack_to_redis_py_which_refuses_it() -> None:
    connection = redis.Connection()
    with pytest.raises(redis.DataError):
        send(connection, ("SET", "k", {"a": 1}))


def test_send_writes_several_commands_in_one_buffer_as_redis_py_packs_them() -> None:
    commands = [("EVALSHA", "a" * 40, 1, "k", "t1"), ("LPUSH", "q", b"\x00" * 10), ("GET", "")]
    writes: list[list[bytes]] = []
    connection = redis.Connection()
    connection.send_packed_command = lambda command, check_health=True: writes.append(list(command))  # type: ignore[method-assign]
    send(connection, *commands)
    assert [len(write) for write in writes] == [1]  # one buffer, one system call
    expected = b"".join(b"".join(connection.pack_command(*args)) for args in commands)
    assert writes[0][0] == expected
