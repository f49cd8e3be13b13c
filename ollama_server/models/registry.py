"""Pull and push Ollama models over the OCI distribution protocol, with any OCI registry.

Ollama's registry speaks the OCI distribution API (the Docker registry v2 API): a model is a
manifest (``/v2/<namespace>/<model>/manifests/<tag>``) naming blobs by sha256 digest
(``/v2/<namespace>/<model>/blobs/<digest>``), so any registry that stores images can hold models,
a private one inside a company network included.

- ``pull_model`` fetches the manifest, downloads the missing blobs in parallel into the store
  (``PartialBlob``: resumed after an interruption with an HTTP range request, sha256 checked
  before it is renamed), skips the blobs already present, and writes the manifest last and
  atomically, so a failed pull never leaves a half model visible.
- ``push_model`` uploads the blobs the registry lacks (``HEAD`` check, then one ``PUT`` or
  ``PATCH`` chunks and a closing ``PUT``) and puts the manifest.
- Both yield Ollama's progress objects (``pulling manifest``, ``pulling <12 hex>`` with
  ``digest``/``total``/``completed``, ``verifying sha256 digest``, ``writing manifest``,
  ``success``; ``retrieving manifest``, ``pushing <12 hex>``, ``pushing manifest``) and fail
  with Ollama's words (``pull model manifest: file does not exist``).
- Authentication: the bearer-token challenge of the distribution spec (``WWW-Authenticate:
  Bearer realm=…,service=…,scope=…`` → a token from the realm, sent as ``Authorization:
  Bearer``), with the credentials of ``registry_auth`` when the token service or a basic-auth
  registry wants them. ``insecure`` (or ``registry_insecure``) means plain HTTP.

A blob that several pulls need at once is downloaded once: later pulls join the transfer in
progress and report its progress; it is cancelled (its partial file kept) when the last pull
waiting for it goes away.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

from ..core.errors import ServiceError
from .store import (
    DEFAULT_HOST,
    MANIFEST_MEDIA,
    MEDIA_PREFIX,
    DigestMismatch,
    ModelName,
    OllamaStore,
    PartialBlob,
    digest_to_hex,
)

log = logging.getLogger(__name__)

OCI_MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
USER_AGENT = "ollama-server (OCI registry client)"
READ_CHUNK = 1 << 20
UPLOAD_CHUNK = 16 << 20  # blobs up to this size go in one PUT, bigger ones in PATCH chunks
RETRIES = 4  # tries of one blob transfer after the first, with doubling pauses
FIRST_PAUSE = 0.5
PROGRESS_EVERY = 0.1  # seconds between progress objects of one layer


class RegistryError(ServiceError):
    """A pull or push failed; Ollama answers these with status 500."""

    status = 500
    kind = "registry_error"


class Cancelled(Exception):
    """The last pull waiting for a transfer went away."""


@dataclass
class RegistrySettings:
    """How to reach registries (from the service configuration)."""

    default_registry: str = DEFAULT_HOST
    insecure_hosts: list[str] = field(default_factory=list)
    credentials: dict[str, str] = field(default_factory=dict)  # host -> "user:password"
    concurrency: int = 4
    timeout: float = 60.0

    @classmethod
    def from_config(cls, config: Any) -> "RegistrySettings":
        """The registry keys of a Config."""
        return cls(default_registry=config.registry,
                   insecure_hosts=list(config.registry_insecure),
                   credentials=dict(config.registry_auth),
                   concurrency=config.registry_concurrency, timeout=config.registry_timeout)


@dataclass(frozen=True)
class Remote:
    """Where a model name lives on the network: ``<scheme>://<host>/v2/<repository>/…``."""

    scheme: str
    host: str
    repository: str
    tag: str

    @classmethod
    def of(cls, name: ModelName, settings: RegistrySettings, insecure: bool) -> "Remote":
        """Names on the default host go to the configured registry; ``insecure`` → HTTP."""
        host = settings.default_registry if name.host == DEFAULT_HOST else name.host
        plain = insecure or host in settings.insecure_hosts
        return cls("http" if plain else "https", host, f"{name.namespace}/{name.model}",
                   name.tag)

    def url(self, *parts: str) -> str:
        """``/v2/<repository>/<parts…>`` on this registry."""
        return f"{self.scheme}://{self.host}/v2/{self.repository}/" + "/".join(parts)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {"realm": …, …})."""
    scheme, _, rest = (header or "").strip().partition(" ")
    params = {key.lower(): quoted if quoted or not bare else bare
              for key, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]*))', rest)}
    return scheme.lower(), params


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


class RegistryClient:
    """HTTP to one registry with the distribution spec's token flow; typed errors."""

    def __init__(self, remote: Remote, settings: RegistrySettings) -> None:
        self.remote = remote
        self.timeout = settings.timeout
        creds = settings.credentials.get(remote.host)
        self._basic: tuple[str, str] | None = tuple(creds.split(":", 1)) if creds else None
        self._use_basic = False
        self._token: str | None = None
        self._lock = threading.Lock()
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                data: bytes | None = None, stream: bool = False) -> requests.Response:
        """One request; a 401 is answered with the challenge's credentials and tried once
        more. Network failures raise RegistryError; HTTP errors are left to ``check``."""
        for attempt in range(2):
            sent = dict(headers or {})
            auth = None
            with self._lock:
                if self._token:
                    sent["Authorization"] = f"Bearer {self._token}"
                elif self._use_basic and self._basic:
                    auth = self._basic
            try:
                resp = self.session.request(method, url, headers=sent, data=data,
                                            stream=stream, auth=auth,
                                            timeout=(min(10.0, self.timeout), self.timeout))
            except requests.RequestException as exc:
                raise RegistryError(describe_network_error(method, url, exc)) from None
            if resp.status_code != 401 or attempt == 1:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            self._authenticate(challenge)
        raise AssertionError("unreachable")

    def _authenticate(self, challenge: str) -> None:
        scheme, params = parse_challenge(challenge)
        hint = (f" (set registry_auth for {self.remote.host} in the service configuration)"
                if self._basic is None else "")
        if scheme == "basic" and self._basic:
            self._use_basic = True
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(f"unauthorized: authentication required{hint}")
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for scope in (params.get("scope") or "").split():
            query.append(("scope", scope))
        realm = params["realm"]
        try:
            resp = self.session.get(realm, params=query, auth=self._basic,
                                    timeout=(min(10.0, self.timeout), self.timeout))
        except requests.RequestException as exc:
            raise RegistryError(describe_network_error("GET", realm, exc)) from None
        if resp.status_code >= 400:
            raise RegistryError(f"{resp.status_code}: {resp.text.strip()}{hint}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token service {realm} answered without a token")
        with self._lock:
            self._token = token

    def check(self, resp: requests.Response, *ok: int) -> requests.Response:
        """``resp`` when its status is one of ``ok``; else RegistryError in Ollama's words."""
        if resp.status_code in ok:
            return resp
        body = "" if resp.request.method == "HEAD" else resp.text.strip()
        resp.close()
        if resp.status_code == 404:
            raise RegistryError("file does not exist")
        if resp.status_code in (401, 403):
            hint = f" (set registry_auth for {self.remote.host} in the service configuration)" \
                if self._basic is None else ""
            raise RegistryError(f"unauthorized: access denied{hint}")
        raise RegistryError(f"{resp.status_code}: {body}" if body else str(resp.status_code))


# --- transfers (one per blob) and their progress -------------------------------------------

class Transfer:
    """One blob moving between the store and a registry, run in its own thread.

    ``completed``/``total`` are read by the progress loop; pulls that need the same blob share
    one Transfer (``waiters``); the last one to leave cancels it.
    """

    def __init__(self, digest: str, total: int) -> None:
        self.digest = digest
        self.total = int(total)
        self.completed = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancel = threading.Event()
        self.waiters = 0

    def start(self, work: Callable[["Transfer"], None]) -> None:
        """Run ``work(self)`` in a thread; its exception becomes ``error``."""

        def run() -> None:
            try:
                work(self)
                self.completed = self.total
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting pulls
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True, name=f"blob-{self.digest[7:19]}").start()

    def progress(self, verb: str) -> dict[str, Any]:
        """Ollama's progress object (zero values left out, as Go's omitempty does)."""
        obj: dict[str, Any] = {"status": f"{verb} {self.digest[7:19]}", "digest": self.digest}
        if self.total:
            obj["total"] = self.total
        if self.completed:
            obj["completed"] = self.completed
        return obj


_active: dict[Path, Transfer] = {}  # downloads in progress, by blob path (any store)
_active_lock = threading.Lock()


def _join_download(path: Path, blob: dict[str, Any],
                   work: Callable[[Transfer], None]) -> Transfer:
    """The download of blob ``path`` in progress, or a new one started with ``work``."""
    while True:
        with _active_lock:
            transfer = _active.get(path)
            if transfer is None or transfer.done.is_set():
                transfer = _active[path] = Transfer(blob["digest"], blob["size"])
                transfer.waiters = 1
                # Progress starts where a resumed download starts.
                partial = PartialBlob.path_of(path)
                if partial.is_file() and partial.stat().st_size <= transfer.total:
                    transfer.completed = partial.stat().st_size

                def tracked(t: Transfer) -> None:
                    try:
                        work(t)
                    finally:
                        with _active_lock:
                            if _active.get(path) is t:
                                del _active[path]

                transfer.start(tracked)
                return transfer
            if not transfer.cancel.is_set():
                transfer.waiters += 1
                return transfer
        # A cancelled download still closing its partial file: start afresh once it is gone.
        transfer.done.wait(1.0)


def _leave(transfer: Transfer) -> None:
    with _active_lock:
        transfer.waiters -= 1
        if transfer.waiters <= 0 and not transfer.done.is_set():
            transfer.cancel.set()


def _run_transfers(starts: list[Callable[[], Transfer]], verb: str,
                   concurrency: int) -> Iterator[dict[str, Any]]:
    """Start the transfers (``concurrency`` at a time) and yield their progress until all are
    done; the first failure is raised (the transfers still running are left, so cancelled
    unless another pull waits for them)."""
    pending = list(starts)
    active: list[Transfer] = []
    shown: dict[int, tuple[int, float]] = {}
    failure: BaseException | None = None
    try:
        while (pending or active) and failure is None:
            while pending and len(active) < concurrency:
                active.append(pending.pop(0)())
            now = time.monotonic()
            for transfer in list(active):
                last = shown.get(id(transfer))
                finished = transfer.done.is_set()
                if finished and transfer.error is not None:
                    failure = transfer.error
                    break
                changed = last is None or transfer.completed != last[0]
                if changed and (finished or last is None or now - last[1] >= PROGRESS_EVERY):
                    yield transfer.progress(verb)
                    shown[id(transfer)] = (transfer.completed, now)
                if finished:
                    active.remove(transfer)
            if active and failure is None:
                active[0].done.wait(PROGRESS_EVERY)
    finally:
        for transfer in active:
            if not transfer.done.is_set():
                _leave(transfer)
    if failure is not None:
        if isinstance(failure, ServiceError):
            raise failure
        raise RegistryError(f"{type(failure).__name__}: {failure}") from failure


# --- pull ------------------------------------------------------------------------------------

def parse_manifest(raw: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, its blobs: layers then config) of a manifest's bytes; RegistryError when it
    is not an Ollama model's manifest."""
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"pull model manifest: not JSON: {exc}") from None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not layers:
        raise RegistryError("pull model manifest: the manifest lists no layers")
    blobs = list(layers)
    if isinstance(manifest.get("config"), dict) and manifest["config"].get("digest"):
        blobs.append(manifest["config"])
    for blob in blobs:
        if not isinstance(blob, dict) or not isinstance(blob.get("size"), int) or \
                blob["size"] < 0:
            raise RegistryError("pull model manifest: a layer has no size")
        try:
            digest_to_hex(blob.get("digest", ""))
        except ServiceError:
            raise RegistryError(f"pull model manifest: unsupported digest "
                                f"{blob.get('digest')!r} (only sha256 is)") from None
    if not any(layer.get("mediaType") == MEDIA_PREFIX + "model" for layer in layers):
        raise RegistryError("pull model manifest: no model layer (application/vnd.ollama."
                            "image.model): this is not an Ollama model")
    return manifest, blobs


def _download(client: RegistryClient, store: OllamaStore, blob: dict[str, Any],
              transfer: Transfer) -> None:
    """Fetch one blob into the store, resuming a partial file; retried on network errors."""
    digest, size = blob["digest"], int(blob["size"])
    url = client.remote.url("blobs", digest)
    partial = PartialBlob(store, digest, size)
    try:
        transfer.completed = partial.open()
        failures = 0
        while partial.offset < size:
            if transfer.cancel.is_set():
                raise Cancelled()
            try:
                _fetch_range(client, url, partial, transfer)
            except (RegistryError, requests.RequestException) as exc:
                if isinstance(exc, RegistryError) and not _retriable(exc):
                    raise
                failures += 1
                message = exc.message if isinstance(exc, RegistryError) else \
                    describe_network_error("GET", url, exc)
                if failures > RETRIES:
                    raise RegistryError(message) from None
                pause = FIRST_PAUSE * 2 ** (failures - 1)
                log.warning("blob %s: %s; try %d of %d in %.1fs (resuming at byte %d)",
                            digest[7:19], message, failures + 1, RETRIES + 1, pause,
                            partial.offset)
                if transfer.cancel.wait(pause):
                    raise Cancelled() from None
        partial.commit()
    finally:
        partial.close()


def _retriable(exc: RegistryError) -> bool:
    text = exc.message
    return text.startswith(("Get ", "5")) or "unexpected EOF" in text


def _fetch_range(client: RegistryClient, url: str, partial: PartialBlob,
                 transfer: Transfer) -> None:
    """One GET from ``partial.offset`` to the end (or until the connection drops)."""
    headers = {"Range": f"bytes={partial.offset}-"} if partial.offset else {}
    resp = client.request("GET", url, headers=headers, stream=True)
    with resp:
        if resp.status_code == 416:  # the partial file is longer than the blob
            partial.restart()
            transfer.completed = 0
            return
        client.check(resp, 200, 206)
        start = 0
        if resp.status_code == 206:
            match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            start = int(match.group(1)) if match else -1
        if start != partial.offset:  # a full answer (no range support): start again
            partial.restart()
            if start != 0:
                raise RegistryError(f"the registry answered a range request with bytes from "
                                    f"{start}; expected {partial.offset}")
        for data in resp.iter_content(READ_CHUNK):
            if transfer.cancel.is_set():
                raise Cancelled()
            partial.write(data)
            transfer.completed = partial.offset
            if partial.offset > partial.size:
                break  # commit() reports the mismatch
    if partial.offset < partial.size:
        raise RegistryError(f'Get "{url}": unexpected EOF')


def pull_model(store: OllamaStore, name: ModelName, settings: RegistrySettings,
               insecure: bool = False) -> Iterator[dict[str, Any]]:
    """Pull ``name`` into ``store``, yielding Ollama's progress objects; RegistryError (or
    DigestMismatch) on failure, with nothing of the model listed."""
    remote = Remote.of(name, settings, insecure)
    # Not closed here: a download this pull started may go on for another pull that joined it.
    client = RegistryClient(remote, settings)
    yield {"status": "pulling manifest"}
    try:
        resp = client.check(client.request(
            "GET", remote.url("manifests", remote.tag),
            headers={"Accept": f"{MANIFEST_MEDIA}, {OCI_MANIFEST_MEDIA}"}), 200)
    except RegistryError as exc:
        raise RegistryError(f"pull model manifest: {exc.message}") from None
    raw = resp.content
    _, blobs = parse_manifest(raw)
    log.info("pulling %s from %s://%s (%d blobs)", name.short, remote.scheme, remote.host,
             len(blobs))
    with store.pinned(b["digest"] for b in blobs):
        starts = []
        for blob in {b["digest"]: b for b in blobs}.values():
            if store.has_blob(blob["digest"]):
                cached = Transfer(blob["digest"], blob["size"])
                cached.completed = cached.total
                yield cached.progress("pulling")
                continue
            path = store.blob_path(blob["digest"])

            def begin(blob: dict[str, Any] = blob, path: Path = path) -> Transfer:
                return _join_download(path, blob, lambda t: _download(client, store, blob, t))

            starts.append(begin)
        yield from _run_transfers(starts, "pulling", settings.concurrency)
        yield {"status": "verifying sha256 digest"}
        for blob in blobs:  # verified while downloading; here: every one is in place
            if not store.has_blob(blob["digest"]):
                raise RegistryError(f"blob {blob['digest']} is missing after the pull")
        yield {"status": "writing manifest"}
        with store.lock:
            path = name.manifest_path(store.manifests_dir)
            old = None
            if path.is_file():
                try:
                    old = store.read_manifest(path)
                except (OSError, ValueError):
                    old = None
            store.write_manifest(name, raw)
        if old and _blob_digests(old) - {b["digest"] for b in blobs}:
            # Blobs only the replaced manifest used go, as Ollama prunes after a pull.
            yield {"status": "removing unused layers"}
            store.prune(old)
    log.info("pulled %s", name.short)
    yield {"status": "success"}


def _blob_digests(manifest: dict[str, Any]) -> set[str]:
    return {str(e.get("digest")) for e in [manifest.get("config") or {},
                                           *manifest.get("layers", [])] if e.get("digest")}


# --- push ------------------------------------------------------------------------------------

def _with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query (an upload location keeps its state)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _upload(client: RegistryClient, store: OllamaStore, blob: dict[str, Any],
            transfer: Transfer) -> None:
    """Upload one blob unless the registry has it: one PUT, or PATCH chunks and a PUT."""
    digest, size = blob["digest"], int(blob["size"])
    remote = client.remote
    exists = client.request("HEAD", remote.url("blobs", digest))
    exists.close()
    if exists.status_code == 200:
        return
    if exists.status_code != 404:
        client.check(exists, 200)
    path = store.blob_path(digest)
    if not path.is_file():
        raise RegistryError(f"blob {digest} is missing from the store: create or pull the "
                            f"model again")
    start = client.check(client.request("POST", remote.url("blobs", "uploads", "")), 202)
    location = urljoin(start.url, start.headers.get("Location", ""))
    start.close()
    octets = {"Content-Type": "application/octet-stream"}
    with open(path, "rb") as fh:
        if size <= UPLOAD_CHUNK:
            data = fh.read()
            client.check(client.request("PUT", _with_query(location, digest=digest),
                                        headers=octets, data=data), 201).close()
            return
        offset = 0
        while offset < size:
            if transfer.cancel.is_set():
                raise Cancelled()
            data = fh.read(UPLOAD_CHUNK)
            headers = {**octets, "Content-Range": f"{offset}-{offset + len(data) - 1}"}
            resp = client.check(client.request("PATCH", location, headers=headers, data=data),
                                202)
            location = urljoin(resp.url, resp.headers.get("Location", location))
            resp.close()
            offset += len(data)
            transfer.completed = offset
    client.check(client.request("PUT", _with_query(location, digest=digest),
                                headers={**octets, "Content-Length": "0"}), 201).close()


def push_model(store: OllamaStore, name: ModelName, settings: RegistrySettings,
               insecure: bool = False) -> Iterator[dict[str, Any]]:
    """Push the stored model ``name`` to its registry, yielding Ollama's progress objects."""
    remote = Remote.of(name, settings, insecure)
    client = RegistryClient(remote, settings)
    try:
        yield {"status": "retrieving manifest"}
        raw = name.manifest_path(store.manifests_dir).read_bytes()
        manifest = json.loads(raw)
        blobs = [*manifest.get("layers", [])]
        if (manifest.get("config") or {}).get("digest"):
            blobs.append(manifest["config"])
        log.info("pushing %s to %s://%s (%d blobs)", name.short, remote.scheme, remote.host,
                 len(blobs))
        starts = []
        for blob in {b["digest"]: b for b in blobs}.values():
            def begin(blob: dict[str, Any] = blob) -> Transfer:
                transfer = Transfer(blob["digest"], blob["size"])
                transfer.waiters = 1
                transfer.start(lambda t: _upload(client, store, blob, t))
                return transfer

            starts.append(begin)
        yield from _run_transfers(starts, "pushing", settings.concurrency)
        yield {"status": "pushing manifest"}
        media = manifest.get("mediaType") or MANIFEST_MEDIA
        client.check(client.request("PUT", remote.url("manifests", remote.tag),
                                    headers={"Content-Type": media}, data=raw), 201).close()
        log.info("pushed %s", name.short)
        yield {"status": "success"}
    finally:
        client.close()


__all__ = ["DigestMismatch", "RegistryError", "RegistrySettings", "Remote", "pull_model",
           "push_model", "parse_challenge", "parse_manifest"]
