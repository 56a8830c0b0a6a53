"""How an upstream answer that no step rewrites is relayed: one body message when small and sized, else streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.http.canonical import parse_query
from gateway.http.forward import WHOLE_BODY_BYTES, encode_query, send_upstream_response
from gateway.policy.core import Policy


class Recorded:
    """Stands in for an aiohttp-backed UpstreamResponse; records how its body was taken."""

    def __init__(self, body: bytes, *, length: int | None, chunk: int = 16 * 1024) -> None:
        self.status = 200
        self.body = body
        self.chunk = chunk
        headers = [(b"Content-Type", b"application/octet-stream"), (b"Server", b"upstream")]
        if length is not None:
            headers.append((b"Content-Length", str(length).encode()))
        self.headers = tuple(headers)
        self.taken: list[str] = []
        self.yielded = 0  # chunks taken from the stream

    async def read(self) -> bytes:
        self.taken.append("read")
        return self.body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        self.taken.append("stream")
        try:
            for start in range(0, len(self.body), self.chunk):
                self.yielded += 1
                yield self.body[start : start + self.chunk]
        finally:
            self.taken.append("closed")


def relay(response: Recorded, *, disconnect_after: int | None = None) -> list[dict[str, Any]]:
    """Relay ``response``; the client disconnects once ``disconnect_after`` body messages were sent."""
    messages: list[dict[str, Any]] = []

    async def run() -> None:
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not received:
                received.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)
            if disconnect_after is not None and len(messages) - 1 >= disconnect_after:
                gone.set()
                await asyncio.sleep(0)  # the server notices the disconnect
                await asyncio.sleep(0)

        received: list[bool] = []
        exchange: Any = None  # not read for a successful answer that no step rewrites
        await send_upstream_response(exchange, Policy(), response, receive, send)  # type: ignore[arg-type]

    asyncio.run(run())
    return messages


def body_of(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(message.get("body", b"") for message in messages[1:])


@pytest.mark.parametrize("size", [0, 900, WHOLE_BODY_BYTES])
def test_a_small_sized_answer_is_read_whole_and_sent_in_one_message(size: int) -> None:
    response = Recorded(bytes(range(256)) * (size // 256) + b"x" * (size % 256), length=size)
    messages = relay(response)
    assert response.taken == ["read"]
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    assert not messages[1].get("more_body", False)
    assert messages[1]["body"] == response.body
    assert (b"content-length", str(size).encode()) in messages[0]["headers"]
    assert (b"server", b"upstream") not in messages[0]["headers"]


@pytest.mark.parametrize(
    ("size", "length"),
    [(WHOLE_BODY_BYTES + 1, WHOLE_BODY_BYTES + 1), (5 * WHOLE_BODY_BYTES, 5 * WHOLE_BODY_BYTES), (900, None)],
)
def test_a_large_or_unsized_answer_is_streamed_chunk_by_chunk(size: int, length: int | None) -> None:
    response = Recorded(b"y" * size, length=length)
    messages = relay(response)
    assert response.taken == ["stream", "closed"]
    bodies = messages[1:]
    assert all(m.get("more_body") for m in bodies[:-1]) and not bodies[-1].get("more_body", False)
    assert len(bodies) == -(-size // response.chunk) + 1  # every chunk as it came, then the end
    assert body_of(messages) == response.body


def test_a_streamed_answer_stops_being_read_once_the_client_has_gone() -> None:
    # uvicorn's send() does nothing after a disconnect: without the watcher, the relay would read the
    # upstream answer to its end for nobody.
    response = Recorded(b"w" * (100 * 16 * 1024), length=None)
    messages = relay(response, disconnect_after=3)
    assert response.yielded <= 5, response.yielded  # of 100 chunks
    assert response.taken == ["stream", "closed"]  # and the chunk iterator was closed, not left pending
    assert len(messages) - 1 <= 4 and messages[-1].get("more_body")  # no end-of-body for nobody


def test_a_streamed_answer_is_relayed_whole_while_the_client_stays() -> None:
    response = Recorded(b"v" * (100 * 16 * 1024), length=None)
    messages = relay(response)
    assert response.yielded == 100 and body_of(messages) == response.body


def test_a_malformed_content_length_is_not_trusted_for_reading_whole() -> None:
    response = Recorded(b"z" * 10, length=None)
    response.headers = (*response.headers, (b"Content-Length", b"-1"))
    messages = relay(response)
    assert response.taken == ["stream", "closed"]
    assert body_of(messages) == b"z" * 10


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"run_id": ["0123abcdef"]}, "run_id=0123abcdef"),  # the one-id fast path
        ({"run_id": [""]}, "run_id="),
        ({"run_id": ["a b"]}, "run_id=a%20b"),
        ({"run_id": ["a&b=c"]}, "run_id=a%26b%3Dc"),  # cannot start another parameter
        ({"run_id": ["\u0661\u0662"]}, "run_id=%D9%A1%D9%A2"),  # Arabic-Indic digits: alnum, not ASCII
        ({"\u043a\u043b\u044e\u0447": ["1"]}, "%D0%BA%D0%BB%D1%8E%D1%87=1"),  # an identifier, not ASCII
        ({"a b": ["1"]}, "a%20b=1"),
        ({"run_id": ["1", "2"]}, "run_id=1&run_id=2"),
        ({"run_id": ["1"], "path": ["x/y"]}, "run_id=1&path=x%2Fy"),
    ],
)
def test_a_checked_query_is_re_encoded_so_the_upstream_reads_the_same_values(
    query: dict[str, list[str]], expected: str
) -> None:
    assert encode_query(query) == expected
    assert parse_query(expected.encode()) == query  # what the upstream parses back is what was checked
