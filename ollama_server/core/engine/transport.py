"""Talking to a running llama-server: its SSE streams read straight off the socket, and the
JSON calls (embeddings, tokenize, templates).

``EngineClient`` is the request half of an engine; ``process.LLAMAExecutor`` adds the process
half (start, supervise, stop) and provides what the client needs from it: ``port``,
``settings``, ``name``, ``failure()`` and ``stderr_tail()``.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
from collections.abc import Iterator
from typing import Any

from ..errors import EngineFailed, Unsupported
from ..jsonio import dumps_compact, loads
from ..relay import RELAY
from ..schemas import Event, Finish, InternalRequest
from .parse import ChatChunkParser, CompletionChunkParser, engine_error
from .payload import build_chat_payload, build_completion_payload


class _NoDelayConnection(http.client.HTTPConnection):
    """An HTTP connection with Nagle's algorithm off: small writes go out at once."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class SSEPayloads:
    """The ``data:`` payloads of a llama-server stream, read in bulk straight off its socket.

    ``http.client``'s ``readline`` on a chunked body costs several Python calls and a buffer
    copy per line; with one token per line that was most of the relay's time. This reads
    whatever the socket has, undoes the chunked framing itself and splits lines with
    ``bytes.split``: a handful of operations per token. ``head`` is the body's start, read
    with the headers.
    """

    def __init__(self, sock: socket.socket, chunked: bool, head: bytes = b"",
                 length: int | None = None) -> None:
        self._sock = sock
        self._chunked = chunked
        self._length = length  # Content-Length of a body that is not chunked
        self._timeout: float | None = None
        self._relayed = False
        self._more = True  # the last relayed read filled its buffer: more may be waiting
        self._hup = False  # the engine hung up (its end of file is still to be read)
        self._raw = b""  # transport bytes not decoded yet (a partial chunk-size line)
        self._left = 0  # bytes left in the current chunk
        self._crlf = False  # the CRLF after a chunk's data is still to come
        self._text = b""  # body bytes not yet split into lines
        self.done = False  # the body ended (last chunk, its length, or the connection closed)
        self._feed(head)

    def _feed(self, data: bytes) -> None:
        if self._chunked:
            self._decode(data)
        else:
            self._text += data
            if self._length is not None and len(self._text) >= self._length:
                self._text = self._text[:self._length]
                self.done = True

    def _decode(self, data: bytes) -> None:
        if not (self._raw or self._left or self._crlf):
            # The common case, a read of exactly one whole chunk (a token): no loop.
            eol = data.find(b"\r\n")
            if 0 < eol < 9:
                try:
                    size = int(data[:eol], 16)
                except ValueError:  # a chunk extension: the general path
                    size = 0
                if size and len(data) == eol + size + 4 and data.endswith(b"\r\n"):
                    self._text += data[eol + 2:eol + 2 + size]
                    return
        buf = self._raw + data if self._raw else data
        pos, end, out = 0, len(buf), []
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                self._crlf = not self._left
            elif self._crlf:
                if end - pos < 2:
                    break
                pos += 2
                self._crlf = False
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.done = True
                    break
                self._left = size
        self._raw = buf[pos:]
        self._text += b"".join(out)

    def _read_relayed(self) -> bytes:
        """The next bytes, read on the relay thread off the non-blocking socket, yielding to
        the relay loop while there are none (see core/relay.py); b"" at the end. A silent
        engine times out as in blocking mode."""
        sock = self._sock
        if not self._relayed:
            self._relayed = True
            self._timeout = sock.gettimeout()
            sock.setblocking(False)
            RELAY.watch(sock)
        elif not self._more:
            # The last read was short, so the socket was drained: new data comes as an edge.
            self._events(RELAY.wait_readable(sock, self._timeout))
        while True:
            try:
                data = sock.recv(65536)
                # A full read may have left more; so may a hang-up seen with the data (its
                # end of file is not signalled again).
                self._more = len(data) == 65536 or self._hup
                return data
            except BlockingIOError:
                self._events(RELAY.wait_readable(sock, self._timeout))

    def _events(self, events: int) -> None:
        if events & _HANGUP:
            self._hup = True

    def read_body(self) -> bytes:
        """The whole body (an error answer), to its end."""
        while not self.done:
            data = self._sock.recv(65536)
            if not data:
                break
            self._feed(data)
        return self._text

    def unwatch(self) -> None:
        """Leave the relay loop (before the socket is closed)."""
        if self._relayed:
            RELAY.unwatch(self._sock)

    def next_batch(self) -> list[bytes]:
        """The payloads of every complete ``data:`` line available (waits for at least one);
        [] when the body has ended."""
        while True:
            if b"\n" in self._text:
                *lines, self._text = self._text.split(b"\n")
                batch = [line[6:].strip() for line in lines if line.startswith(b"data: ")]
                if batch:
                    return batch
            if self.done:
                return []
            data = self._read_relayed() if RELAY.in_relay() else self._sock.recv(65536)
            if not data:
                self.done = True
                return []
            self._feed(data)


class EngineStream:
    """The events of one streamed llama-server answer; ``close()`` cancels it in the engine."""

    def __init__(self, executor: "EngineClient", sock: socket.socket, payloads: SSEPayloads,
                 parser: ChatChunkParser | CompletionChunkParser) -> None:
        self._executor = executor
        self._sock = sock
        self._parser = parser
        self._payloads = payloads
        self.closed = False

    def __iter__(self) -> Iterator[Event]:
        completion = isinstance(self._parser, CompletionChunkParser)
        process = self._parser.process
        try:
            while True:
                try:
                    batch = self._payloads.next_batch()
                except (OSError, ValueError, AttributeError) as exc:
                    if self.closed:
                        return
                    raise self._executor.failure(
                        f"connection to llama-server lost: {exc}") from exc
                if not batch:
                    if self.closed:
                        return
                    raise self._executor.failure("llama-server closed the stream early")
                for data in batch:
                    if data == b"[DONE]":
                        return
                    chunk = loads(data)
                    if "error" in chunk and isinstance(chunk["error"], dict):
                        err = chunk["error"]
                        raise engine_error(int(err.get("code") or 500), json.dumps(chunk),
                                           self._executor.stderr_tail())
                    finished = False
                    for event in process(chunk):
                        finished = finished or isinstance(event, Finish)
                        yield event
                    if finished and completion:
                        return
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection; llama-server then stops generating for this request."""
        if self.closed:
            return
        self.closed = True
        self._payloads.unwatch()
        try:
            self._sock.close()
        except OSError:
            pass


class EngineClient:
    """The requests a running engine serves; mixed into ``LLAMAExecutor``.

    Each call raises the service's typed errors: ``failure()`` (a lost engine, noted as a
    crash so the next request restarts it) or ``engine_error`` (an answer of the engine).
    """

    port: int | None
    name: str

    def failure(self, message: str) -> EngineFailed:  # pragma: no cover - see LLAMAExecutor
        raise NotImplementedError

    def stderr_tail(self, n: int = 8) -> str:  # pragma: no cover - see LLAMAExecutor
        raise NotImplementedError


    def _running_port(self) -> int:
        port = self.port
        if port is None:
            raise self.failure(f"llama-server for {self.name} is not running")
        return port

    def _connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return _NoDelayConnection("127.0.0.1", self._running_port(),
                                  timeout=timeout or self.settings.request_timeout)

    def call_json(self, method: str, path: str, body: Any = None,
                  timeout: float | None = None) -> Any:
        """One JSON request to llama-server; typed errors on failure."""
        if RELAY.in_relay():  # inside a relayed stream (an Ollama final ``context``)
            return RELAY.call(self.call_json, method, path, body, timeout)
        conn = self._connect(timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self.failure(f"llama-server request {path} failed: {exc}") from exc
        finally:
            conn.close()
        if resp.status != 200:
            raise engine_error(resp.status, raw, self.stderr_tail())
        return json.loads(raw) if raw else {}

    def open_stream(self, req: InternalRequest) -> EngineStream:
        """Send a generation request and wait for its first result.

        Everything that can fail before the first token (a prompt over the context, a bad
        grammar, a dead engine) raises here, before the caller has sent a byte.
        """
        if RELAY.in_relay():  # the second part of a min_tokens generation
            return RELAY.call(self.open_stream, req)
        parser: ChatChunkParser | CompletionChunkParser
        if req.is_chat:
            path, payload = "/v1/chat/completions", build_chat_payload(req)
            last = req.messages[-1] if req.messages else None
            parser = ChatChunkParser(last.content if last and last.role == "assistant"
                                     and not last.tool_calls else None, req.top_logprobs)
        else:
            path, payload = build_completion_payload(req)
            parser = CompletionChunkParser()
        try:
            sock, status, payloads = self._post_stream(path, payload)
        except TimeoutError as exc:
            raise EngineFailed(f"llama-server did not answer within "
                               f"{self.settings.request_timeout:.0f}s") from exc
        except (OSError, ValueError) as exc:
            raise self.failure(f"llama-server request failed: {exc}") from exc
        if status != 200:
            try:
                raw = payloads.read_body()
            except OSError:
                raw = b""
            finally:
                sock.close()
            raise engine_error(status, raw, self.stderr_tail())
        return EngineStream(self, sock, payloads, parser)

    def _post_stream(self, path: str, payload: dict[str, Any]
                     ) -> tuple[socket.socket, int, SSEPayloads]:
        """POST ``payload`` to the engine on a plain socket; the socket, the status and the
        body's reader once the headers are in.

        ``http.client`` parses the headers with the ``email`` package and resolves the
        address each time: about 0.4 ms of Python per request, on the way to the first token.
        llama-server's answer needs none of it: a status line and a few headers.
        """
        port = self._running_port()
        body = dumps_compact(payload)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.settings.request_timeout)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (path.encode(), port, len(body), body))
            data = b""
            while (end := data.find(b"\r\n\r\n")) < 0:
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("the connection closed before the answer's headers")
                data += more
            status_line, *lines = data[:end].split(b"\r\n")
            status = int(status_line.split(None, 2)[1])
            headers = {}
            for line in lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            chunked = headers.get(b"transfer-encoding") == b"chunked"
            length = None if chunked or b"content-length" not in headers \
                else int(headers[b"content-length"])
            return sock, status, SSEPayloads(sock, chunked, data[end + 4:], length)
        except BaseException:
            sock.close()
            raise

    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
        """(vectors, prompt tokens) for each input, from llama-server's embeddings endpoint."""
        if not self.settings.embeddings:
            raise Unsupported("embeddings are turned off in this service's configuration")
        out = self.call_json("POST", "/v1/embeddings",
                             {"input": inputs, "encoding_format": "float"})
        data = sorted(out.get("data", []), key=lambda d: d.get("index", 0))
        return ([d["embedding"] for d in data],
                int((out.get("usage") or {}).get("prompt_tokens", 0)))

    def tokenize(self, text: str, add_special: bool = True,
                 with_pieces: bool = False) -> list[Any]:
        """Token ids (or ``{id, piece}`` objects) of ``text`` with the model's tokenizer."""
        out = self.call_json("POST", "/tokenize", {"content": text, "add_special": add_special,
                                                   "with_pieces": with_pieces})
        return out.get("tokens", [])

    def detokenize(self, tokens: list[int]) -> str:
        """Text of a list of token ids."""
        return self.call_json("POST", "/detokenize", {"tokens": tokens}).get("content", "")

    def apply_template(self, req: InternalRequest) -> str:
        """The prompt text the engine would build for a chat request."""
        payload = build_chat_payload(req)
        body = {k: payload[k] for k in ("messages", "tools", "tool_choice",
                                        "chat_template_kwargs", "add_generation_prompt")
                if k in payload}
        return self.call_json("POST", "/apply-template", body).get("prompt", "")
