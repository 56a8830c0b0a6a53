"""How an upstream answer that no step rewrites is relayed: one body message when small and sized, else streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.http.forward import WHOLE_BODY_BYTES, send_upstream_response
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

    async def read(self) -> bytes:
        self.taken.append("read")
        return self.body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        self.taken.append("stream")
        for start in range(0, len(self.body), self.chunk):
            yield self.body[start : start + self.chunk]


def relay(response: Recorded) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    exchange: Any = None  # not read for a successful answer that no step rewrites
    asyncio.run(send_upstream_response(exchange, Policy(), response, send))  # type: ignore[arg-type]
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
    assert response.taken == ["stream"]
    bodies = messages[1:]
    assert all(m.get("more_body") for m in bodies[:-1]) and not bodies[-1].get("more_body", False)
    assert len(bodies) == -(-size // response.chunk) + 1  # every chunk as it came, then the end
    assert body_of(messages) == response.body


def test_a_malformed_content_length_is_not_trusted_for_reading_whole() -> None:
    response = Recorded(b"z" * 10, length=None)
    response.headers = (*response.headers, (b"Content-Length", b"-1"))
    messages = relay(response)
    assert response.taken == ["stream"]
    assert body_of(messages) == b"z" * 10
