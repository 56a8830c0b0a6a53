"""The upstream HTTP/1.1 client (gateway/http/upstream.py) against scripted raw TCP upstreams.

Each test starts its fake upstream inside its own event loop (``asyncio.start_server`` on an ephemeral
port) and scripts it byte by byte: the answers the client must parse (chunked, delimited by the end of
the connection, interim 103, HEAD, invalid), the connection-level events it must survive (a close while
idle, unsolicited bytes, a stall, a cut body) and what the upstream must see (which connection each
request arrived on, how many were open at once, the exact header bytes).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.http.upstream import UpstreamClient

SCENARIO_LIMIT = 5.0  # a hang fails the test instead of waiting for pytest-timeout


@dataclass(frozen=True)
class Request:
    """One request the fake upstream read completely."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]  # as received: names in the client's case, raw value bytes
    body: bytes
    connection: int  # which accepted connection (1, 2, ...)

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


class Peer:
    """One accepted connection, as a scripted handler drives it."""

    def __init__(
        self, upstream: Upstream, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.upstream = upstream
        self.number = number
        self.reader = reader
        self.writer = writer
        self.requests: list[Request] = []
        self.closed = False  # the client closed (or reset) this connection, as the upstream saw it

    async def request(self) -> Request | None:
        """Read one whole request; ``None`` when the client closed the connection instead."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            self.upstream.received += exc.partial
            self.closed = True
            return None
        except ConnectionError:
            self.closed = True
            return None
        self.upstream.received += head
        lines = head[:-4].split(b"\r\n")
        method, target, _version = lines[0].decode("latin-1").split(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        length = next((int(value) for name, value in headers if name.lower() == b"content-length"), 0)
        body = await self.reader.readexactly(length) if length else b""
        self.upstream.received += body
        request = Request(method, target, headers, body, self.number)
        self.requests.append(request)
        self.upstream.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_client(self, within: float = 2.0) -> None:
        """Wait (at most ``within`` seconds) for the client to close the connection; any byte it sends is recorded."""
        try:
            async with asyncio.timeout(within):
                while data := await self.reader.read(65536):
                    self.upstream.received += data
        except TimeoutError:
            return
        except ConnectionError:
            pass
        self.closed = True


Handler = Callable[[Peer], Awaitable[None]]


class Upstream:
    """What the fake upstream saw: connections accepted, open at once, requests, raw bytes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.peers: list[Peer] = []
        self.requests: list[Request] = []
        self.received = bytearray()
        self.errors: list[BaseException] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def url(self, scheme: str = "http", userinfo: str = "") -> str:
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}"

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        peer = Peer(self, self.accepted, reader, writer)
        self.peers.append(peer)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            peer.closed = True
        except asyncio.CancelledError:  # the server is closing; the task ends quietly (3.11 logs a cancelled one)
            pass
        except Exception as exc:  # a broken script: reported when the server is closed
            self.errors.append(exc)
        finally:
            self.open -= 1
            self.tasks.discard(task)
            writer.close()


@asynccontextmanager
async def serve(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    upstream = Upstream(handler)
    server = await asyncio.start_server(upstream.accept, "127.0.0.1", 0, ssl=tls)
    try:
        upstream.port = server.sockets[0].getsockname()[1]
        yield upstream
    finally:
        server.close()
        tasks = list(upstream.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(server.wait_closed(), 1.0)
    assert not upstream.errors, upstream.errors


@asynccontextmanager
async def started(
    url: str, *, read_timeout: float = 0.5, pool_size: int = 10, connect_timeout: float = 0.5
) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(url, connect_timeout=connect_timeout, timeout=read_timeout, pool_size=pool_size)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_LIMIT))


async def until(predicate: Callable[[], bool], within: float = 1.0) -> None:
    """Wait until ``predicate()`` holds; fails the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    """A keep-alive 200 answer with Content-Length; ``extra`` is more header lines, each ending in CRLF."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


async def echo_targets(peer: Peer) -> None:
    """Answer every request on the connection with its own target as the body."""
    while (request := await peer.request()) is not None:
        await peer.send(ok(request.target.encode()))


async def get(client: UpstreamClient, target: str) -> tuple[int, bytes]:
    response = await client.send("GET", target, headers={})
    return response.status, await response.read()


# --- 1-5: framing of the answer and what it means for the connection


def test_a_chunked_answer_is_read_whole_names_keep_their_case_and_the_connection_is_reused() -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            if request.target != "/chunked":
                await peer.send(ok(b"second"))
                continue
            await peer.send(b"HTTP/1.1 200 OK\r\nX-Upstream-MiXed: Kept\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"5\r\nhello\r\n", b"6\r\n world\r\n", b"1\r\n!\r\n", b"0\r\n\r\n"):
                await asyncio.sleep(0.01)  # several reads on the client's side
                await peer.send(piece)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            response = await client.send("GET", "/chunked", headers={})
            assert response.status == 200
            assert await response.read() == b"hello world!"
            assert (b"X-Upstream-MiXed", b"Kept") in response.headers
            assert (b"Transfer-Encoding", b"chunked") in response.headers
            assert await get(client, "/next") == (200, b"second")
            assert upstream.accepted == 1
            assert [request.connection for request in upstream.requests] == [1, 1]

    run(scenario)


def test_a_body_delimited_by_the_end_of_the_connection_is_read_whole_then_a_new_connection_is_used() -> None:
    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await echo_targets(peer)
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await asyncio.sleep(0.02)
        await peer.send(b"the end")
        # the handler returns: the connection is closed, which ends the body

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            response = await client.send("GET", "/first", headers={})
            assert response.status == 200
            assert await response.read() == b"until the end"
            assert await get(client, "/second") == (200, b"/second")
            assert upstream.accepted == 2
            assert [request.connection for request in upstream.requests] == [1, 2]

    run(scenario)


def test_an_answer_saying_connection_close_is_not_reused() -> None:
    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await echo_targets(peer)
        await peer.request()
        await peer.send(ok(b"bye", b"Connection: close\r\n"))
        await peer.wait_closed_by_client()  # the upstream does not close it: the client must

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            assert await get(client, "/first") == (200, b"bye")
            assert await get(client, "/second") == (200, b"/second")
            assert [request.connection for request in upstream.requests] == [1, 2]
            await until(lambda: upstream.peers[0].closed)
            assert len(upstream.peers[0].requests) == 1

    run(scenario)


def test_a_head_answer_has_no_body_despite_its_content_length() -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            body = b"" if request.method == "HEAD" else b"0123456789"
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + body)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            response = await asyncio.wait_for(client.send("HEAD", "/thing", headers={}), 1.0)
            assert response.status == 200
            assert (b"Content-Length", b"10") in response.headers
            assert await asyncio.wait_for(response.read(), 1.0) == b""
            assert await get(client, "/thing") == (200, b"0123456789")
            assert [(request.method, request.connection) for request in upstream.requests] == [
                ("HEAD", 1),
                ("GET", 2),
            ]
            await until(lambda: upstream.peers[0].closed)

    run(scenario)


def test_an_interim_103_is_skipped_and_its_headers_are_not_kept() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n")
        await asyncio.sleep(0.02)
        await peer.send(ok(b"final", b"X-Final: yes\r\n"))
        await echo_targets(peer)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            response = await client.send("GET", "/hinted", headers={})
            assert response.status == 200
            assert await response.read() == b"final"
            names = [name.lower() for name, _ in response.headers]
            assert b"link" not in names
            assert names == [b"content-type", b"x-final", b"content-length"]
            assert await get(client, "/after") == (200, b"/after")  # the connection is still usable
            assert upstream.accepted == 1

    run(scenario)


# --- 6-8: invalid, cut short, too slow


def test_an_answer_that_is_not_http_is_an_upstream_error_and_is_not_retried() -> None:
    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await echo_targets(peer)
        await peer.request()
        await peer.send(b"HELLO WORLD\r\n\r\n")
        await peer.wait_closed_by_client()

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            with pytest.raises(UpstreamError) as caught:
                await client.send("GET", "/garbage", headers={})
            assert type(caught.value) is UpstreamError
            assert caught.value.status == 502
            assert len(upstream.requests) == 1  # a GET that received an answer, even a bad one, is not re-sent
            await until(lambda: upstream.peers[0].closed)
            assert await get(client, "/after") == (200, b"/after")
            assert upstream.requests[-1].connection == 2

    run(scenario)


def test_a_body_cut_short_is_unavailable_and_its_connection_is_not_reused() -> None:
    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await echo_targets(peer)
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            response = await client.send("GET", "/cut", headers={})
            assert response.status == 200
            with pytest.raises(UpstreamUnavailable):
                await response.read()
            assert await get(client, "/after") == (200, b"/after")
            assert [request.connection for request in upstream.requests] == [1, 2]

    run(scenario)


def test_an_upstream_that_never_answers_times_out_after_the_read_timeout() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.wait_closed_by_client(3.0)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url(), read_timeout=0.5) as client:
            began = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                await client.send("GET", "/silent", headers={})
            elapsed = time.monotonic() - began
            assert 0.45 <= elapsed < 1.2, elapsed
            assert len(upstream.requests) == 1  # a timeout is never retried
            await until(lambda: upstream.peers[0].closed, 0.5)  # the stuck connection was dropped

    run(scenario)


def test_a_body_that_stalls_times_out_on_read() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await peer.wait_closed_by_client(3.0)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url(), read_timeout=0.5) as client:
            response = await client.send("GET", "/stall", headers={})
            assert response.status == 200
            began = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                await response.read()
            elapsed = time.monotonic() - began
            assert 0.3 <= elapsed < 1.2, elapsed
            await until(lambda: upstream.peers[0].closed, 0.5)

    run(scenario)


# --- 9-12: the pool


def test_a_post_on_a_pooled_connection_the_upstream_closed_goes_on_a_new_connection_once() -> None:
    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await echo_targets(peer)
        await peer.request()
        await peer.send(ok(b"first"))  # keep-alive as far as the headers go, then closed

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            assert await get(client, "/first") == (200, b"first")
            await asyncio.sleep(0.1)  # the client sees the close while the connection is idle
            response = await client.send("POST", "/create", headers={}, body=b'{"name": "once"}')
            assert (response.status, await response.read()) == (200, b"/create")
            posts = [request for request in upstream.requests if request.method == "POST"]
            assert len(posts) == 1
            assert posts[0].connection == 2
            assert posts[0].body == b'{"name": "once"}'

    run(scenario)


def test_a_streamed_answer_pauses_reading_while_the_consumer_does_not_take_it() -> None:
    size = 64 * 1024 * 1024
    written = 0
    finished: float | None = None

    async def handler(peer: Peer) -> None:
        nonlocal written, finished
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        piece = bytes(1024 * 1024)
        for _ in range(size // len(piece)):
            await peer.send(piece)  # drain: returns once the transport's buffer is low again
            written += len(piece)
        finished = time.monotonic()
        await echo_targets(peer)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url(), read_timeout=5.0) as client:
            response = await client.send("GET", "/big", headers={})
            assert response.status == 200
            async with aclosing(response.iter_chunks()) as chunks:
                total = len(await anext(chunks))
                await asyncio.sleep(0.5)
                assert finished is None, "the upstream wrote the whole body: the client did not pause reading"
                assert written < size // 2, written
                async for chunk in chunks:
                    total += len(chunk)
            assert total == size
            await until(lambda: finished is not None)
            assert await get(client, "/after") == (200, b"/after")  # read to its end: the connection is reused
            assert upstream.accepted == 1

    run(scenario)


def test_a_cr_lf_or_space_in_a_header_or_target_is_refused_before_anything_is_sent() -> None:
    async def scenario() -> None:
        async with serve(echo_targets) as upstream, started(upstream.url()) as client:
            with pytest.raises(ValueError):
                await client.send("GET", "/x", headers={"X-Note": "a\r\nX-Evil: 1"})
            with pytest.raises(ValueError):
                await client.send("GET", "/x", headers={"X-Note": "a\nX-Evil: 1"})
            with pytest.raises(ValueError):
                await client.send("GET", "/x", headers={"X-Note\r\nX-Evil": "1"})
            with pytest.raises(ValueError):
                await client.send("GET", "/a b", headers={})
            with pytest.raises(ValueError):
                await client.send("GET", "/a\r\nX-Evil: 1", headers={})
            with pytest.raises(ValueError):
                await client.send("POST", "/a\nb", headers={}, body=b"{}")
            await asyncio.sleep(0.05)
            assert upstream.accepted == 0
            assert bytes(upstream.received) == b""
            assert await get(client, "/fine") == (200, b"/fine")  # the client is still usable
            assert b"evil" not in bytes(upstream.received).lower()

    run(scenario)


def test_the_pool_never_opens_more_connections_than_its_size() -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            await asyncio.sleep(0.1)
            await peer.send(ok(request.target.encode()))

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url(), pool_size=2) as client:
            results = await asyncio.gather(*(get(client, f"/{n}") for n in range(6)))
            assert results == [(200, f"/{n}".encode()) for n in range(6)]
            assert len(upstream.requests) == 6
            assert upstream.max_open == 2
            assert upstream.accepted == 2  # the waiting requests reused the two connections

    run(scenario)


def test_a_cancelled_pool_waiter_does_not_swallow_the_wake_up_meant_for_the_next_one() -> None:
    async def scenario() -> None:
        async with serve(echo_targets) as upstream, started(upstream.url(), pool_size=1) as client:
            holding = await client.send("GET", "/a", headers={})  # the only connection is busy
            second = asyncio.create_task(get(client, "/b"))
            third = asyncio.create_task(get(client, "/c"))
            await asyncio.sleep(0.05)  # both wait for the connection
            assert await holding.read() == b"/a"  # releases it: the first waiter (second) is woken...
            second.cancel()  # ...and cancelled before it runs (its client went away)
            with pytest.raises(asyncio.CancelledError):
                await second
            assert await asyncio.wait_for(third, 1.0) == (200, b"/c")
            assert upstream.accepted == 1

    run(scenario)


# --- 13-14: what the URL says


def test_credentials_in_the_url_become_basic_authorization_and_host_is_the_urls() -> None:
    async def scenario() -> None:
        async with serve(echo_targets) as upstream:
            async with started(upstream.url(userinfo="user:p%40ss@")) as client:
                assert await get(client, "/who") == (200, b"/who")
                response = await client.send("GET", "/again", headers={"Host": "evil.example"})
                assert await response.read() == b"/again"
            expected = b"Basic " + base64.b64encode(b"user:p@ss")
            for request in upstream.requests:
                assert request.values(b"authorization") == [expected]
                assert request.values(b"host") == [f"127.0.0.1:{upstream.port}".encode()]

    run(scenario)


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_tls_refuses_an_unknown_certificate_and_accepts_a_trusted_one(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)

    async def scenario() -> None:
        async with serve(echo_targets, tls=server_context) as upstream, started(upstream.url("https")) as client:
            with pytest.raises(UpstreamUnavailable):  # a man in the middle: refused
                await client.send("GET", "/secret", headers={})
            assert upstream.requests == []
            client._ssl = ssl.create_default_context(cafile=str(cert_file))
            assert await get(client, "/secret") == (200, b"/secret")
            assert len(upstream.requests) == 1

    run(scenario)


# --- 15-17: idle bytes, cancellation, close


def test_bytes_sent_on_an_idle_pooled_connection_drop_it() -> None:
    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await echo_targets(peer)
        await peer.request()
        await peer.send(ok(b"first"))
        await asyncio.sleep(0.05)
        await peer.send(ok(b"nobody asked"))  # would be taken for the next request's answer
        await peer.wait_closed_by_client()

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url()) as client:
            assert await get(client, "/first") == (200, b"first")
            await until(lambda: upstream.peers[0].closed)  # the client dropped the connection
            assert await get(client, "/second") == (200, b"/second")
            assert [request.connection for request in upstream.requests] == [1, 2]

    run(scenario)


def test_cancelling_a_send_closes_its_connection() -> None:
    async def handler(peer: Peer) -> None:
        if peer.number > 1:
            return await echo_targets(peer)
        await peer.request()
        await peer.wait_closed_by_client(3.0)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url(), read_timeout=3.0) as client:
            task = asyncio.create_task(client.send("GET", "/slow", headers={}))
            await until(lambda: len(upstream.requests) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: upstream.peers[0].closed, 0.5)
            assert await get(client, "/after") == (200, b"/after")
            assert [request.connection for request in upstream.requests] == [1, 2]

    run(scenario)


def test_close_fails_a_read_in_progress_and_later_sends() -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await peer.wait_closed_by_client(3.0)

    async def scenario() -> None:
        async with serve(handler) as upstream, started(upstream.url(), read_timeout=3.0) as client:
            response = await client.send("GET", "/long", headers={})
            reading = asyncio.create_task(response.read())
            await asyncio.sleep(0.05)
            assert not reading.done()
            await client.close()
            with pytest.raises(UpstreamUnavailable):
                await asyncio.wait_for(reading, 1.0)
            with pytest.raises(UpstreamUnavailable):
                await client.send("GET", "/later", headers={})
            await until(lambda: upstream.peers[0].closed, 0.5)
            assert len(upstream.requests) == 1

    run(scenario)


# --- 18: the request's bytes


def test_content_length_is_sent_as_the_body_and_method_call_for_and_latin_1_values_stay_single_bytes() -> None:
    async def scenario() -> None:
        async with serve(echo_targets) as upstream, started(upstream.url()) as client:
            sent = [
                ("POST", "/with-body", {"Content-Length": "999"}, b'{"a": 1}'),
                ("POST", "/no-body", {}, None),
                ("GET", "/get", {"X-Name": "caf\xe9"}, None),
            ]
            for method, target, headers, body in sent:
                response = await client.send(method, target, headers=headers, body=body)
                assert await response.read() == target.encode()
            with_body, no_body, plain = upstream.requests
            assert with_body.values(b"content-length") == [b"8"]  # the caller's own value is not sent
            assert with_body.body == b'{"a": 1}'
            assert no_body.values(b"content-length") == [b"0"]
            assert plain.values(b"content-length") == []
            assert plain.values(b"x-name") == [b"caf\xe9"]
            assert b"X-Name: caf\xe9\r\n" in bytes(upstream.received)

    run(scenario)


def test_a_large_body_arrives_whole_after_its_head_and_the_connection_is_reused() -> None:
    """A body above JOINED_BODY_BYTES is written after the head instead of joined to it: the upstream sees the same."""
    large = bytes(range(256)) * 1024  # 256 KiB

    async def scenario() -> None:
        async with serve(echo_targets) as upstream, started(upstream.url()) as client:
            for target, body in (("/large", large), ("/small", b"{}")):
                response = await client.send("POST", target, headers={"content-type": "text/plain"}, body=body)
                assert await response.read() == target.encode()
            first, second = upstream.requests
            assert first.values(b"content-length") == [str(len(large)).encode()]
            assert first.body == large
            assert second.body == b"{}" and second.connection == first.connection

    run(scenario)


def test_reading_a_closed_response_fails_instead_of_waiting() -> None:
    """close() before the body arrived, then read(): UpstreamUnavailable at once, not a wait that never ends."""

    async def scenario() -> None:
        async def headers_only(peer: Peer) -> None:
            if await peer.request() is not None:
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
                await peer.wait_closed_by_client()

        async with serve(headers_only) as upstream, started(upstream.url(), read_timeout=3.0) as client:
            response = await client.send("GET", "/", headers={})
            response.close()
            with pytest.raises(UpstreamUnavailable):
                await asyncio.wait_for(response.read(), 1.0)

    run(scenario)
