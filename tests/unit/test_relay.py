"""The relay thread (core/relay.py) with real sockets: socket pairs stand for the engine and
the client, and an engine stream is read with the executor's own SSEPayloads."""

from __future__ import annotations

import contextvars
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ollama_server.core.engine.transport import SSEPayloads
from ollama_server.core.relay import RELAY, output_started, pin_to_thread, pinned, relayable


def engine_frames(engine: socket.socket, log: list[str] | None = None) -> Iterator[bytes]:
    """What a stream generator does: read the engine's ``data:`` lines, yield frames."""
    payloads = SSEPayloads(engine, chunked=False)
    try:
        while True:
            batch = payloads.next_batch()
            if not batch:
                return
            for data in batch:
                yield b"data: " + data + b"\n\n"
    finally:
        payloads.unwatch()
        if log is not None:
            log.append("closed")


def read_chunked(sock: socket.socket) -> list[bytes]:
    """The chunks of an HTTP/1.1 chunked body up to EOF of the socket."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        out.append(rest[:size])
        assert rest[size:size + 2] == b"\r\n"
        data = rest[size + 2:]
    return out


def relay_in_thread(frames: Iterator[bytes], client: socket.socket, chunked: bool = True
                    ) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            RELAY.run_stream(frames, client, chunked)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            result["error"] = exc
        finally:
            client.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_frames_arrive_in_order_with_chunk_framing() -> None:
    engine_w, engine_r = socket.socketpair()
    client_w, client_r = socket.socketpair()
    engine_r.settimeout(10)
    thread, result = relay_in_thread(engine_frames(engine_r), client_w)
    for i in range(50):
        engine_w.sendall(b"data: {\"n\":%d}\n\n" % i)
        if i % 7 == 0:
            time.sleep(0.01)  # some tokens arrive alone, some together
    engine_w.close()
    chunks = read_chunked(client_r)
    thread.join(10)
    assert "error" not in result
    assert chunks == [b'data: {"n":%d}\n\n' % i for i in range(50)]


def test_many_streams_share_the_relay_thread() -> None:
    pairs = [(socket.socketpair(), socket.socketpair()) for _ in range(40)]
    threads = []
    for (_, engine_r), (client_w, _) in pairs:
        engine_r.settimeout(10)
        threads.append(relay_in_thread(engine_frames(engine_r), client_w))
    for step in range(20):
        for k, ((engine_w, _), _) in enumerate(pairs):
            engine_w.sendall(b"data: %d-%d\n\n" % (k, step))
    for (engine_w, _), _ in pairs:
        engine_w.close()
    for k, (_, (_, client_r)) in enumerate(pairs):
        assert read_chunked(client_r) == [b"data: %d-%d\n\n" % (k, s) for s in range(20)]
    for thread, result in threads:
        thread.join(10)
        assert "error" not in result


def test_a_slow_client_gets_everything() -> None:
    engine_w, engine_r = socket.socketpair()
    client_w, client_r = socket.socketpair()
    client_w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    engine_r.settimeout(10)
    thread, result = relay_in_thread(engine_frames(engine_r), client_w, chunked=False)
    big = b"x" * 200_000
    writer = threading.Thread(target=lambda: (engine_w.sendall(b"data: " + big + b"\n\n"),
                                              engine_w.close()))
    writer.start()
    time.sleep(0.3)  # the relay fills the client's buffer and waits for it to drain
    received = b""
    while chunk := client_r.recv(1000):
        received += chunk
    writer.join(10)
    thread.join(10)
    assert "error" not in result
    assert received == b"data: " + big + b"\n\n"


def test_a_client_that_went_away_closes_the_stream() -> None:
    engine_w, engine_r = socket.socketpair()
    client_w, client_r = socket.socketpair()
    engine_r.settimeout(10)
    log: list[str] = []
    thread, result = relay_in_thread(engine_frames(engine_r, log), client_w)
    engine_w.sendall(b"data: 1\n\n")
    assert client_r.recv(100)
    client_r.close()
    for _ in range(50):  # until a write fails
        engine_w.sendall(b"data: 2\n\n")
        time.sleep(0.01)
        if "error" in result:
            break
    thread.join(10)
    assert isinstance(result.get("error"), OSError)
    assert log == ["closed"]  # the generator was closed: its engine stream is cancelled


def test_a_silent_engine_times_out() -> None:
    engine_w, engine_r = socket.socketpair()
    client_w, client_r = socket.socketpair()
    engine_r.settimeout(0.3)
    started = time.monotonic()
    thread, result = relay_in_thread(engine_frames(engine_r), client_w)
    engine_w.sendall(b"data: 1\n\n")
    thread.join(10)
    assert isinstance(result.get("error"), TimeoutError)
    assert 0.3 <= time.monotonic() - started < 3
    assert read_chunked(client_r) == [b"data: 1\n\n"]
    engine_w.close()


def test_blocking_calls_run_on_the_request_thread() -> None:
    client_w, client_r = socket.socketpair()
    where: list[str] = []

    def frames() -> Iterator[bytes]:
        assert RELAY.in_relay()
        where.append(RELAY.call(lambda: threading.current_thread().name))
        with pytest.raises(ValueError, match="from the request thread"):
            RELAY.call(lambda: (_ for _ in ()).throw(ValueError("from the request thread")))
        yield b"done"

    result: dict = {}

    def run() -> None:
        try:
            RELAY.run_stream(frames(), client_w, False)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc
        client_w.close()

    thread = threading.Thread(target=run, name="request-thread")
    thread.start()
    thread.join(10)
    assert "error" not in result
    assert where == ["request-thread"]
    assert client_r.recv(100) == b"done"


def test_the_stream_keeps_its_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    client_w, client_r = socket.socketpair()

    def frames() -> Iterator[bytes]:
        yield var.get().encode()

    var.set("the request's")
    RELAY.run_stream(frames(), client_w, False)
    client_w.close()
    assert client_r.recv(100) == b"the request's"


def test_pin_to_thread_is_per_context() -> None:
    def pin_and_report() -> bool:
        pin_to_thread()
        return pinned()

    assert contextvars.copy_context().run(pin_and_report)
    assert not pinned()


def test_a_stream_is_relayable_from_its_first_output_unless_pinned() -> None:
    def stages(pin_first: bool) -> list[bool]:
        seen = [relayable()]
        if pin_first:
            pin_to_thread()
        output_started()
        seen.append(relayable())
        pin_to_thread()
        seen.append(relayable())
        return seen

    assert contextvars.copy_context().run(stages, False) == [False, True, False]
    assert contextvars.copy_context().run(stages, True) == [False, False, False]
    assert not relayable()
