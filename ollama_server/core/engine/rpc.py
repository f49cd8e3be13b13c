"""llama.cpp RPC workers (``ggml-rpc-server`` on other hosts): their endpoints and reachability.

A worker has no authentication and runs whatever tensors it is sent, so it belongs on a trusted
private network: ``check_endpoint`` refuses a public address unless explicitly allowed.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass


class EndpointError(ValueError):
    """An RPC endpoint is unparsable, unresolvable or not allowed."""


@dataclass(frozen=True)
class Endpoint:
    """``host:port`` of one worker."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``10.0.0.2:50052``, ``[fd00::2]:50052`` or ``worker-1:50052`` → Endpoint."""
    text = str(text).strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise EndpointError(f"{text!r} is not host:port (IPv6 as [addr]:port)")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise EndpointError(f"{text!r} is not host:port (IPv6 as [addr]:port)")
    if not host:
        raise EndpointError(f"{text!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise EndpointError(f"{text!r} has no valid port") from None
    if not 0 < port < 65536:
        raise EndpointError(f"{text!r}: port {port} is out of range")
    return Endpoint(host, port)


def is_private_address(addr: str) -> bool:
    """True for loopback, private (RFC 1918, ULA), link-local and carrier-grade NAT addresses."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    cgnat = ip.version == 4 and ip in ipaddress.ip_network("100.64.0.0/10")
    return ip.is_loopback or ip.is_private or ip.is_link_local or cgnat


def check_endpoint(text: str, allow_public: bool = False) -> Endpoint:
    """Parse ``text`` and make sure every address it resolves to is private (or allowed)."""
    ep = parse_endpoint(text)
    if allow_public:
        return ep
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EndpointError(f"{ep}: cannot resolve {ep.host!r} ({exc}); use an address or a "
                            f"name this host can resolve") from None
    public = sorted({info[4][0] for info in infos if not is_private_address(info[4][0])})
    if public:
        raise EndpointError(
            f"{ep} resolves to the public address {', '.join(public)}: an RPC worker has no "
            f"authentication and must only be reached over a trusted private network. Use a "
            f"private address, or set allow_public_rpc: true if this network is trusted")
    return ep


# The RPC protocol of the pinned llama.cpp (ggml/include/ggml-rpc.h): a worker of another
# major version, or a newer minor one, is refused by llama-server.
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
_RPC_CMD_HELLO = 14
_RPC_CONN_CAPS_SIZE = 24


@dataclass(frozen=True)
class WorkerStatus:
    """What a worker answered: ``ready`` (idle, right protocol), ``busy`` (it accepted the
    connection but serves another client: a worker serves one llama-server at a time),
    ``no_answer`` (the connection itself timed out: its one-place queue is full because it is
    busy, or the host is unreachable), ``incompatible`` (another protocol version) or
    ``down`` (connection refused or failed)."""

    state: str
    detail: str = ""

    @property
    def usable(self) -> bool:
        """True when an engine can use the worker now."""
        return self.state == "ready"

    def describe(self) -> str:
        """A few words for an error message or /health."""
        words = {"ready": "ready", "down": "unreachable",
                 "busy": "busy serving another llama-server (a worker serves one at a time)",
                 "no_answer": "not answering: busy serving another llama-server, or the "
                              "host is unreachable",
                 "incompatible": "built from another llama.cpp"}
        return words[self.state] + (f" ({self.detail})" if self.detail else "")


def hello(endpoint: str | Endpoint, timeout: float = 1.0) -> WorkerStatus:
    """Say HELLO in the worker's own protocol and read its version.

    A plain TCP connect is not enough: a worker busy with another llama-server still
    accepts connections into its queue and then answers nothing.
    """
    import struct

    ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
    except TimeoutError:
        return WorkerStatus("no_answer", f"no connection within {timeout:g}s")
    except OSError as exc:
        return WorkerStatus("down", exc.strerror or str(exc) or type(exc).__name__)
    try:
        sock.settimeout(timeout)
        sock.sendall(bytes([_RPC_CMD_HELLO]) + struct.pack("<Q", _RPC_CONN_CAPS_SIZE)
                     + bytes(_RPC_CONN_CAPS_SIZE))
        want = 8 + 4 + _RPC_CONN_CAPS_SIZE
        data = b""
        while len(data) < want:
            chunk = sock.recv(want - len(data))
            if not chunk:
                return WorkerStatus("incompatible", "it closed the connection on HELLO")
            data += chunk
    except TimeoutError:
        return WorkerStatus("busy", f"no answer within {timeout:g}s")
    except OSError as exc:
        return WorkerStatus("down", exc.strerror or str(exc))
    finally:
        sock.close()
    major, minor, patch = data[8], data[9], data[10]
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        return WorkerStatus("incompatible", f"protocol {major}.{minor}.{patch}, this engine "
                                            f"speaks {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}")
    return WorkerStatus("ready", f"protocol {major}.{minor}.{patch}")


def local_gpu_count() -> int:
    """NVIDIA GPUs the driver shows this machine (0 without a driver); no process is run."""
    from pathlib import Path

    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else 0
    except OSError:
        return 0
