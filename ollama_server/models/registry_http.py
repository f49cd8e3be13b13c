"""HTTP to registries, held to what a hostile registry cannot abuse (pure transport, no store).

- Where requests may go: ``HostPolicy`` refuses loopback, private and link-local addresses
  (server-side request forgery through a model name, a redirect or a token realm) unless the
  host is named in the configuration or ``registry_allow_private`` is on, and checks the
  address actually connected; credentials go only to the origin they belong to.
- How much is read: every answer is streamed and decoded piece by piece under a cap
  (manifests, tokens and error bodies; gzip and deflate bombs stop at the cap).
- ``RegistryError`` and ``RegistrySettings``, shared with ``registry`` (pull and push).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ..core.engine.rpc import is_private_address
from ..core.errors import ServiceError
from .store import (
    DEFAULT_HOST,
)

log = logging.getLogger(__name__)

USER_AGENT = "ollama-server (OCI registry client)"
READ_CHUNK = 1 << 20
MANIFEST_CAP = 4 << 20
TOKEN_CAP = 64 << 10
ERROR_CAP = 64 << 10  # bytes of an error answer read; the rest is never read
ERROR_SHOWN = 1000  # characters of it quoted in the error
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RegistryError(ServiceError):
    """A pull or push failed; Ollama answers these with status 500."""

    status = 500
    kind = "registry_error"


@dataclass
class RegistrySettings:
    """How to reach registries (from the service configuration)."""

    default_registry: str = DEFAULT_HOST
    insecure_hosts: list[str] = field(default_factory=list)
    credentials: dict[str, str] = field(default_factory=dict)  # host -> "user:password"
    concurrency: int = 4
    timeout: float = 60.0
    # Hosts on loopback, private and link-local addresses may be reached (the hosts named
    # above may always be).
    allow_private: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "RegistrySettings":
        """The registry keys of a Config."""
        return cls(default_registry=config.registry,
                   insecure_hosts=list(config.registry_insecure),
                   credentials=dict(config.registry_auth),
                   concurrency=config.registry_concurrency, timeout=config.registry_timeout,
                   allow_private=config.registry_allow_private)


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return seen


def describe_network_error(method: str, url: str, exc: BaseException) -> str:
    """A failed connection in the words Ollama (Go's net/http) uses, with what to do."""
    netloc = urlsplit(url).netloc
    root = _root_cause(exc)
    text = str(root) or type(root).__name__
    if isinstance(exc, requests.exceptions.SSLError):
        return (f'{method.title()} "{url}": tls: {text} (a registry without TLS needs '
                f'"insecure": true, or its host in registry_insecure)')
    if isinstance(exc, requests.exceptions.Timeout):
        return f'{method.title()} "{url}": i/o timeout'
    if isinstance(root, ConnectionRefusedError) or "refused" in text.lower():
        return f'{method.title()} "{url}": dial tcp {netloc}: connect: connection refused'
    if "Name or service not known" in text or "nodename nor servname" in text or \
            "Temporary failure in name resolution" in text:
        return f'{method.title()} "{url}": dial tcp: lookup {netloc}: no such host'
    return f'{method.title()} "{url}": {text}'


# --- where requests may go, and how much of an answer is read (issue 25) ---------------------

def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port filled in from the scheme: what credentials
    belong to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # an origin nothing else has
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def _host_keys(url: str) -> set[str]:
    """How the configuration may name the host of ``url``: ``host:port``, and ``host`` alone
    when the port is the scheme's default (``registry_auth``, ``registry_insecure`` keys)."""
    scheme, host, port = origin_of(url)
    if ":" in host:  # IPv6, written in brackets in a host[:port]
        host = f"[{host}]"
    keys = {f"{host}:{port}"}
    if port == _DEFAULT_PORTS.get(scheme):
        keys.add(host)
    return keys


def is_internal_address(addr: str) -> bool:
    """True for an address a registry may not be reached at without ``registry_allow_private``:
    loopback, private, link-local and carrier-grade NAT (``is_private_address``), unspecified,
    multicast and reserved ones, and IPv6 forms that carry such an IPv4 address (mapped,
    NAT64, 6to4, Teredo)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None,
                    ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None]
        candidates += [e for e in embedded if e is not None]
    return any(is_private_address(str(c)) or c.is_unspecified or c.is_multicast or c.is_reserved
               for c in candidates)


def _refusal(host: str, addresses: str) -> str:
    return (f"{host} is at {addresses}, a loopback, private or link-local address: refused, "
            f"as a registry there could reach services inside this network. For a registry "
            f"you trust, name it in registry, registry_insecure or registry_auth, or set "
            f"registry_allow_private: true in the service configuration")


class HostPolicy:
    """Which hosts a pull or push may reach (server-side request forgery, CVE-2026-5530).

    Hosts the configuration names (``registry``, ``registry_insecure``, ``registry_auth``) are
    trusted; any other host, whether named by a model name, a redirect, a token realm or an
    upload location, must resolve only to public addresses unless ``allow_private``. The
    address actually connected is checked again (``_guarded_session``), so a name that resolves
    differently the second time (DNS rebinding) gains nothing.
    """

    def __init__(self, settings: RegistrySettings) -> None:
        self.allow_private = settings.allow_private
        named = [settings.default_registry, *settings.insecure_hosts, *settings.credentials]
        self.trusted = frozenset(h.strip().lower() for h in named if h and h.strip())

    def trusts(self, url: str) -> bool:
        """True when the host of ``url`` may be on any address."""
        return self.allow_private or bool(_host_keys(url) & self.trusted)

    def check(self, method: str, url: str) -> None:
        """RegistryError unless ``url`` is http(s) to a host this policy lets through."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in _DEFAULT_PORTS:
            raise RegistryError(f'{method.title()} "{url}": unsupported protocol scheme '
                                f'"{parts.scheme}"')
        scheme, host, port = origin_of(url)
        if not host or port == -1:
            raise RegistryError(f'{method.title()} "{url}": invalid host in the URL')
        if self.trusts(url):
            return
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return  # the request fails with Ollama's "no such host"
        internal = sorted({info[4][0] for info in infos if is_internal_address(info[4][0])})
        if internal:
            raise RegistryError(f'{method.title()} "{url}": '
                                f'{_refusal(parts.netloc, ", ".join(internal))}')

    def check_peer(self, scheme: str, host: str, port: int, sock: socket.socket) -> None:
        """Close ``sock`` and raise RegistryError when it is connected to an address this
        policy refuses for ``host``."""
        if self.trusts(f"{scheme}://{host}:{port}/"):
            return
        peer = sock.getpeername()[0]
        if is_internal_address(peer):
            sock.close()
            raise RegistryError(_refusal(f"{host}:{port}", peer))


def _guarded_session(policy: HostPolicy) -> requests.Session:
    """A Session whose every direct connection is checked against ``policy`` once connected
    (through a proxy, the proxy connects and only the name is checked)."""

    def guarded(base: type[HTTPConnection], scheme: str) -> type[HTTPConnection]:
        class Guarded(base):  # type: ignore[valid-type, misc]
            def _new_conn(self) -> socket.socket:
                sock = super()._new_conn()
                policy.check_peer(scheme, self.host, self.port, sock)
                return sock

        return Guarded

    class Plain(HTTPConnectionPool):
        ConnectionCls = guarded(HTTPConnection, "http")

    class Secure(HTTPSConnectionPool):
        ConnectionCls = guarded(HTTPSConnection, "https")

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Plain, "https": Secure}

    session = requests.Session()
    session.mount("http://", Adapter())
    session.mount("https://", Adapter())
    # Blobs are compressed already, and Range requests count encoded bytes: ask for none.
    session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    return session


class TooLarge(Exception):
    """An answer went past its cap (it is not read further)."""


def _content_coding(resp: requests.Response) -> str | None:
    """The one content coding of ``resp`` this client inflates (gzip, deflate), or None."""
    header = resp.headers.get("Content-Encoding", "")
    codings = [c.strip().lower() for c in header.split(",")
               if c.strip().lower() not in ("", "identity")]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return codings[0]
    raise RegistryError(f"the registry answered with Content-Encoding: {header}, which this "
                        f"client does not decode (it asks for identity): fix the registry or "
                        f"the proxy in front of it")


class _Inflater:
    """gzip or deflate inflated at most READ_CHUNK bytes at a time (a bomb never inflates
    in memory at once)."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.raw_deflate = False
        self.fed = False
        self.done = False
        self.obj = self._new()

    def _new(self) -> Any:
        if self.coding != "deflate":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return zlib.decompressobj(-zlib.MAX_WBITS if self.raw_deflate else zlib.MAX_WBITS)

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of the next ``data``; what follows the end is ignored."""
        while not self.done:
            try:
                out = self.obj.decompress(data, READ_CHUNK)
            except zlib.error as exc:
                if self.coding == "deflate" and not self.fed and not self.raw_deflate:
                    self.raw_deflate = True  # "deflate" without its zlib header, as some send
                    self.obj = self._new()
                    continue
                raise RegistryError(f"the registry's {self.coding} answer is corrupt: {exc}") \
                    from None
            self.fed = True
            data = self.obj.unconsumed_tail
            if out:
                yield out
            if self.obj.eof:
                rest = self.obj.unused_data
                if self.coding != "deflate" and rest[:2] == b"\x1f\x8b":
                    self.obj, data = self._new(), rest  # another gzip member
                    continue
                self.done = True
            elif not data and len(out) < READ_CHUNK:
                return  # a full piece may leave more pending: asked again with no input


def _raw_chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body's bytes as they came (de-chunked, not decoded); urllib3's errors become
    requests' (as ``iter_content`` makes them), so the retry logic sees one kind."""
    try:
        yield from resp.raw.stream(READ_CHUNK, decode_content=False)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise requests.exceptions.ConnectionError(exc) from exc


def iter_body(resp: requests.Response, limit: int) -> Iterator[bytes]:
    """The body of ``resp`` decoded, in pieces of at most READ_CHUNK bytes; TooLarge as soon
    as more than ``limit`` decoded bytes (or more than about as many raw ones) come."""
    coding = _content_coding(resp)
    inflater = _Inflater(coding) if coding else None
    raw_limit = limit + limit // 64 + (64 << 10)  # gzip's overhead on incompressible bytes
    raw_total = total = 0
    for raw in _raw_chunks(resp):
        raw_total += len(raw)
        if raw_total > raw_limit:
            raise TooLarge()
        for piece in inflater.pieces(raw) if inflater else (raw,):
            total += len(piece)
            if total > limit:
                raise TooLarge()
            yield piece


def read_body(resp: requests.Response, cap: int) -> bytes:
    """The whole decoded body of ``resp``, at most ``cap`` bytes (TooLarge past it, before
    reading when Content-Length says so); network failures as RegistryError."""
    length = resp.headers.get("Content-Length", "")
    if _content_coding(resp) is None and length.isdigit() and int(length) > cap:
        raise TooLarge()
    try:
        return b"".join(iter_body(resp, cap))
    except requests.RequestException as exc:
        raise RegistryError(describe_network_error(resp.request.method or "GET", resp.url,
                                                   exc)) from None


def error_text(resp: requests.Response) -> str:
    """The start of an error answer's body (ERROR_CAP bytes read at most), for a message."""
    if resp.request.method == "HEAD":
        return ""
    got = bytearray()
    try:
        for piece in iter_body(resp, ERROR_CAP):
            got += piece
    except (TooLarge, RegistryError, requests.RequestException):
        pass
    text = got[:ERROR_CAP].decode("utf-8", "replace").strip()
    return text if len(text) <= ERROR_SHOWN else text[:ERROR_SHOWN] + "…"


def _basic_header(creds: str) -> str:
    return "Basic " + base64.b64encode(creds.encode()).decode()
