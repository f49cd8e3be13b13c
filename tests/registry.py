"""A real OCI registry for the pull/push tests: Debian's ``docker-registry`` (the CNCF
distribution registry v2) on loopback with a temporary storage folder, its token
authentication with a small token service, and a TCP proxy that logs requests and can cut a
download mid-transfer (``make registry`` installs the registry)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
import yaml

from ollama_server.models.store import ModelName, OllamaStore
from tests.helpers import REAL_MODELS, free_port

REGISTRY_BINARY = Path("/usr/bin/docker-registry")


def require_registry_binary() -> Path:
    """The registry binary; a clear failure (never a skip) when it is missing."""
    if not os.access(REGISTRY_BINARY, os.X_OK) or shutil.which("openssl") is None:
        raise RuntimeError(f"{REGISTRY_BINARY} or openssl is missing: run `make registry` "
                           f"(installs Debian's docker-registry and openssl)")
    return REGISTRY_BINARY


class RegistryProcess:
    """``docker-registry serve`` on 127.0.0.1 with its storage in ``root/data``."""

    def __init__(self, root: Path, auth: dict[str, Any] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.storage = root / "data"
        self.storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        if auth:
            config["auth"] = auth
        self.config = root / "config.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None
        self._log = open(root / "registry.log", "ab")

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, as it appears in model names."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "RegistryProcess":
        """Start it and wait until ``/v2/`` answers (200, or 401 with authentication on)."""
        self.proc = subprocess.Popen([str(require_registry_binary()), "serve", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}: "
                                   f"{self.log()}")
            try:
                if requests.get(f"http://{self.address}/v2/", timeout=2).status_code in (200,
                                                                                        401):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"docker-registry did not answer: {self.log()}")

    def kill(self) -> None:
        """SIGKILL: the registry dies mid-transfer, as a crashed host would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; always reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def log(self) -> str:
        return (self.root / "registry.log").read_text(errors="replace")[-3000:]

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (its filesystem driver's layout)."""
        hexd = digest.split(":", 1)[1]
        return (self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data")


# --- token authentication ------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """The token service of the distribution spec's bearer flow, for a registry configured
    with ``auth.token``: checks Basic credentials and issues RS256 JWTs whose ``x5c`` header
    carries the certificate the registry trusts (``rootcertbundle``)."""

    ISSUER = "ollama-server-test-issuer"
    SERVICE = "ollama-server-test-registry"

    def __init__(self, root: Path, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.key = root / "token.key"
        self.cert = root / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-subj", "/CN=ollama-server-test-token", "-keyout", str(self.key),
                        "-out", str(self.cert)], check=True, capture_output=True)
        pem = self.cert.read_text()
        self._der_b64 = "".join(line for line in pem.splitlines() if "-----" not in line)
        self.issued: list[dict[str, Any]] = []  # (user, scopes) of every token given
        self.refused = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                service._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict[str, Any]:
        """The registry's ``auth`` configuration that trusts this service."""
        return {"token": {"realm": self.realm, "service": self.SERVICE,
                          "issuer": self.ISSUER, "rootcertbundle": str(self.cert)}}

    def _sign(self, data: bytes) -> bytes:
        return subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                              input=data, check=True, capture_output=True).stdout

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        auth = h.headers.get("Authorization", "")
        given = base64.b64decode(auth[6:]).decode() if auth.startswith("Basic ") else ""
        if given != f"{self.user}:{self.password}":
            self.refused += 1
            body = b'{"details":"incorrect username or password"}'
            h.send_response(401)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        query = parse_qs(urlsplit(h.path).query)
        scopes = [s for item in query.get("scope", []) for s in item.split()]
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":", 2)
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        self.issued.append({"user": self.user, "scopes": scopes,
                            "service": query.get("service", [""])[0]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._der_b64]}
        claims = {"iss": self.ISSUER, "sub": self.user, "aud": self.SERVICE, "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode())).encode()
        token = signing_input.decode() + "." + _b64url(self._sign(signing_input))
        body = json.dumps({"token": token, "expires_in": 600}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- a proxy that can cut a download ---------------------------------------------------------

class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of a registry that logs every HTTP request it
    forwards (method, path, Range header) and, when armed, cuts one blob download:

    after ``after`` bytes of that blob's answer it stops forwarding, waits until ``others``
    other blob requests have come in (a pull that downloads in parallel has sent them by
    then), calls ``on_cut`` (which kills the registry), stops listening and closes every
    connection, so the next connection attempts are refused, as with a host that went down.
    Nothing here depends on timing: the cut lands at a byte count, never at a moment.
    """

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.requests: list[dict[str, str]] = []
        self.cut: dict[str, Any] | None = None  # what had been requested when it cut
        self._armed: dict[str, Any] | None = None
        self._lock = threading.Condition()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "CuttingProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def arm(self, digest: str, after: int, others: int, on_cut: Any) -> None:
        """Cut the next download of blob ``digest`` after ``after`` bytes (see the class)."""
        self.cut = None
        self._armed = {"digest": digest, "after": after, "others": others, "on_cut": on_cut}

    def blob_requests(self) -> list[dict[str, str]]:
        """The logged GETs of blobs, in order."""
        with self._lock:
            return [r for r in self.requests if r["method"] == "GET" and "/blobs/" in r["path"]]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        """Stop listening and close every connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            state: dict[str, Any] = {"last": None}
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream, state),
                             daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, state),
                             daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, state: dict[str, Any]) -> None:
        buf = b""
        body_left = 0
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
            buf += data
            while True:
                if body_left:
                    skip = min(body_left, len(buf))
                    buf, body_left = buf[skip:], body_left - skip
                    if body_left:
                        break
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
                lines = head.split("\r\n")
                method, path = (lines[0].split(" ") + ["", ""])[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:])}
                body_left = int(headers.get("content-length") or 0)
                entry = {"method": method, "path": path, "range": headers.get("range", "")}
                with self._lock:
                    self.requests.append(entry)
                    self._lock.notify_all()
                state["last"] = entry
                state["sent"] = 0
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _answers(self, src: socket.socket, dst: socket.socket, state: dict[str, Any]) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
            except OSError:
                break
            armed = self._armed
            last = state.get("last") or {}
            if armed and last.get("method") == "GET" and \
                    last.get("path", "").endswith(armed["digest"]):
                state["sent"] = state.get("sent", 0) + len(data)
                if state["sent"] >= armed["after"]:
                    self._armed = None
                    self._cut(armed)
                    return
            try:
                dst.sendall(data)
            except OSError:
                break
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _cut(self, armed: dict[str, Any]) -> None:
        with self._lock:
            # Waiting for the other blob requests is what makes a sequential pull fail here:
            # it would only send them after this download, which is held.
            self._lock.wait_for(lambda: sum(
                1 for r in self.requests if r["method"] == "GET" and "/blobs/" in r["path"]
                and not r["path"].endswith(armed["digest"])) >= armed["others"], timeout=60)
            self.cut = {"requests": [dict(r) for r in self.requests]}
        armed["on_cut"]()
        self.close()


# --- a scripted (malicious) registry for the security tests (issue 25) ----------------------

def link_model_store(root: Path, model: str = "smollm2:135m") -> Path:
    """A store at ``root`` holding only ``model`` of the real store, its blobs hard-linked (or
    copied)."""
    src, dst = OllamaStore(REAL_MODELS), OllamaStore(root)
    name = ModelName.parse(model)
    raw = name.manifest_path(src.manifests_dir).read_bytes()
    manifest = json.loads(raw)
    dst.blobs_dir.mkdir(parents=True, exist_ok=True)
    for entry in [manifest["config"], *manifest["layers"]]:
        try:
            os.link(src.blob_path(entry["digest"]), dst.blob_path(entry["digest"]))
        except OSError:
            shutil.copyfile(src.blob_path(entry["digest"]), dst.blob_path(entry["digest"]))
    dst.write_manifest(name, raw)
    return root


class Answer:
    """What a ScriptedServer sends: a status, headers and a body. A bytes body goes with its
    Content-Length (unless ``headers`` sets one); an iterable of bytes goes chunked, one
    chunk each, and stops when the client hangs up."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None,
                 body: Any = b"") -> None:
        self.status = status
        self.headers = dict(headers or {})
        self.body = body


def json_answer(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """A JSON body."""
    return Answer(status, {"Content-Type": "application/json", **(headers or {})},
                  json.dumps(obj).encode())


class ScriptedServer:
    """An HTTP/1.1 server on a loopback address that answers every request as ``route``
    (request dict → Answer) says, and records each one (method, path, headers, body size):
    a registry, token service or upload host that does what an attacker wants."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.requests: list[dict[str, Any]] = []
        self.route: Any = self.default_route
        self.sent = 0  # body bytes written, over every answer
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                server._handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def default_route(request: dict[str, Any]) -> Answer:
        return json_answer({"errors": [{"code": "NOT_FOUND"}]}, 404)

    @property
    def address(self) -> str:
        """``host:port``, as it appears in model names."""
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def reset(self) -> None:
        """Forget the requests and answer 404 again."""
        self.requests.clear()
        self.route = self.default_route
        self.sent = 0

    def authorizations(self) -> list[str]:
        """The Authorization headers received (one per request that had one)."""
        return [r["headers"]["authorization"] for r in self.requests
                if "authorization" in r["headers"]]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        size = 0
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = h.rfile.readline()
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    h.rfile.readline()
                    break
                size += len(h.rfile.read(n))
                h.rfile.readline()
        else:
            left = int(headers.get("content-length") or 0)
            while left:
                got = len(h.rfile.read(min(left, 1 << 20)))
                if not got:
                    break
                size, left = size + got, left - got
        request = {"method": h.command, "path": h.path, "headers": headers, "size": size}
        self.requests.append(request)
        answer = self.route(request)
        try:
            h.send_response(answer.status)
            body = answer.body
            names = {k.lower() for k in answer.headers}
            for key, value in answer.headers.items():
                h.send_header(key, value)
            if isinstance(body, bytes | bytearray):
                if "content-length" not in names:
                    h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                if h.command != "HEAD":
                    h.wfile.write(body)
                    self.sent += len(body)
                return
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            h.close_connection = True
            for chunk in body:
                if chunk:
                    h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.sent += len(chunk)
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True  # the client hung up: what a refusal looks like

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
