"""SSEPayloads: a llama-server body, chunked or not, however the socket splits it."""

from __future__ import annotations

import random

import pytest

from ollama_server.core.engine.transport import SSEPayloads


class Pieces:
    """A socket stand-in that returns the body in the given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def recv(self, n: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def chunked(parts: list[bytes], extension: bool = False) -> bytes:
    ext = b";name=value" if extension else b""
    return b"".join(b"%X%s\r\n%s\r\n" % (len(p), ext, p) for p in parts) + b"0\r\n\r\n"


def payloads_of(sock: Pieces, is_chunked: bool) -> list[bytes]:
    reader, out = SSEPayloads(sock, is_chunked), []
    while batch := reader.next_batch():
        out += batch
    return out


EVENTS = [b'data: {"n":%d,"text":"%s"}\n\n' % (i, b"x" * (i % 37)) for i in range(200)]
EXPECTED = [e[6:].strip() for e in EVENTS]


@pytest.mark.parametrize("seed", range(20))
def test_any_split_of_a_chunked_body_gives_the_same_payloads(seed):
    rng = random.Random(seed)
    # One chunk per event (as llama-server sends them), sometimes several events in one.
    parts, i = [], 0
    while i < len(EVENTS):
        k = rng.choice([1, 1, 1, 2, 3])
        parts.append(b"".join(EVENTS[i:i + k]))
        i += k
    body = chunked(parts, extension=seed % 5 == 0)
    if seed % 2:  # reads that are exactly one chunk each: the fast path
        pieces = [chunk + b"\r\n" for chunk in body.split(b"\r\n")[:-1]]
        pieces = [b"".join(pieces[j:j + 2]) for j in range(0, len(pieces), 2)]
    else:  # reads cut anywhere, through sizes, data and CRLFs
        cuts = sorted(rng.sample(range(1, len(body)), 150))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert b"".join(pieces) == body
    assert payloads_of(Pieces(pieces), True) == EXPECTED


def test_a_body_that_is_not_chunked():
    body = b"".join(EVENTS)
    assert payloads_of(Pieces([body[:1000], body[1000:]]), False) == EXPECTED


def test_an_error_body_is_read_to_its_length():
    sock = Pieces([b'{"error":', b'{"code":400}}', b"never read"])
    reader = SSEPayloads(sock, False, b"", length=len(b'{"error":{"code":400}}'))
    assert reader.read_body() == b'{"error":{"code":400}}'
    assert SSEPayloads(Pieces([]), False, b"", length=0).read_body() == b""
