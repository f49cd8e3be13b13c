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

A registry is not trusted (issue 25): every digest of a manifest is checked before any file is
written or any request names it (CVE-2024-37032); credentials (``registry_auth`` and tokens)
only go to the origin (scheme, host, port) they belong to, whatever a challenge, a redirect or an
upload ``Location`` says; hosts on loopback, private or link-local addresses are refused unless
the configuration names them or sets ``registry_allow_private`` (the name, every address it
resolves to and the address actually connected are checked, for redirects and token services
too); at most ``MAX_REDIRECTS`` http(s) redirects are followed; every answer is read with a cap
on its decoded size (``MANIFEST_CAP``, ``TOKEN_CAP``, ``ERROR_CAP``, a blob's manifest size),
inflated piece by piece, so a gzip bomb or an endless body costs no memory (``registry_http``).

Why one module of about 700 lines: pull and push are one protocol client; they share the
client (challenges, tokens, retries), the transfer bookkeeping of concurrent pulls of the same
blob and the progress objects, and splitting them would put one state machine in two files.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

from ..core.errors import ServiceError
from .registry_http import (  # noqa: F401 (RegistryError, RegistrySettings: this module's API too)
    _REDIRECTS,
    MANIFEST_CAP,
    MAX_REDIRECTS,
    TOKEN_CAP,
    HostPolicy,
    RegistryError,
    RegistrySettings,
    TooLarge,
    _basic_header,
    _content_coding,
    _guarded_session,
    _host_keys,
    describe_network_error,
    error_text,
    is_internal_address,
    iter_body,
    origin_of,
    read_body,
)
from .store import (
    DEFAULT_HOST,
    MANIFEST_MEDIA,
    MEDIA_PREFIX,
    DigestMismatch,
    ModelName,
    OllamaStore,
    PartialBlob,
)

log = logging.getLogger(__name__)

OCI_MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
UPLOAD_CHUNK = 16 << 20  # blobs up to this size go in one PUT, bigger ones in PATCH chunks
RETRIES = 4  # tries of one blob transfer after the first, with doubling pauses
FIRST_PAUSE = 0.5
PROGRESS_EVERY = 0.1  # seconds between progress objects of one layer
# Caps on what a registry's answer may put in memory (decoded bytes); a blob is capped by the
# size its manifest gives. A manifest or a token answer is a few KiB.
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # fullmatch: no trailing newline, no "../"


class Cancelled(Exception):
    """The last pull waiting for a transfer went away."""


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


class RegistryClient:
    """HTTP to one registry with the distribution spec's token flow; typed errors.

    Every response is streamed: its body is read with a cap (``read_body``, ``iter_body``,
    ``error_text``) and the caller closes it.
    """

    def __init__(self, remote: Remote, settings: RegistrySettings) -> None:
        self.remote = remote
        self.settings = settings
        self.timeout = settings.timeout
        self.origin = origin_of(remote.url())
        creds = settings.credentials.get(remote.host)
        self._basic: str | None = _basic_header(creds) if creds else None
        self._use_basic = False
        self._token: str | None = None
        self._lock = threading.Lock()
        self.policy = HostPolicy(settings)
        self.session = _guarded_session(self.policy)

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def _send(self, method: str, url: str, headers: dict[str, str] | None, data: bytes | None,
              owner: tuple[str, str, int | None], auth: str | None) -> requests.Response:
        """One request and its redirects: at most MAX_REDIRECTS, http(s) only, every host
        checked by the policy; ``auth`` (an Authorization value) only goes to ``owner``."""
        headers = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            self.policy.check(method, url)
            sent = dict(headers)
            if auth and origin_of(url) == owner:
                sent["Authorization"] = auth
            try:
                resp = self.session.request(method, url, headers=sent, data=data, stream=True,
                                            allow_redirects=False,
                                            timeout=(min(10.0, self.timeout), self.timeout))
            except requests.RequestException as exc:
                raise RegistryError(describe_network_error(method, url, exc)) from None
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECTS or not location:
                return resp
            resp.close()
            url = urljoin(url, location)
            if (resp.status_code == 303 and method != "HEAD") or \
                    (resp.status_code in (301, 302) and method == "POST"):
                method, data = "GET", None  # as browsers and Go do
                headers = {k: v for k, v in headers.items()
                           if k.lower() not in ("content-type", "content-length",
                                                "content-range")}
        raise RegistryError(f'{method.title()} "{url}": stopped after {MAX_REDIRECTS} '
                            f'redirects')

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                data: bytes | None = None) -> requests.Response:
        """One request (streamed); a 401 of the registry is answered with the challenge's
        credentials and tried once more. Network failures raise RegistryError; HTTP errors
        are left to ``check``."""
        for attempt in range(2):
            with self._lock:
                auth = f"Bearer {self._token}" if self._token else \
                    self._basic if self._use_basic else None
            resp = self._send(method, url, headers, data, self.origin, auth)
            if resp.status_code != 401 or attempt == 1 or origin_of(resp.url) != self.origin:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            self._authenticate(challenge)
        raise AssertionError("unreachable")

    def _credentials_for(self, url: str) -> str | None:
        """The Basic credentials that may go to ``url``: the registry's to its own origin;
        to another host only those configured for that host, and over plain HTTP only when
        the registry itself is plain HTTP or that host is in registry_insecure."""
        if origin_of(url) == self.origin:
            return self._basic
        keys = _host_keys(url)
        creds = next((v for k, v in self.settings.credentials.items()
                      if k.strip().lower() in keys), None)
        plain_ok = self.remote.scheme == "http" or bool(
            keys & {h.strip().lower() for h in self.settings.insecure_hosts})
        if creds is None or (urlsplit(url).scheme.lower() == "http" and not plain_ok):
            return None
        return _basic_header(creds)

    def _hint(self, realm: str | None = None) -> str:
        """What to configure after a refusal (empty when credentials were given)."""
        host = self.remote.host
        if realm and origin_of(realm) != self.origin:
            other = urlsplit(realm).netloc
            if self._basic is None:
                return (f" (set registry_auth for {host} in the service configuration, and "
                        f"for {other}, its token service: credentials only go to the host "
                        f"they are set for)")
            if self._credentials_for(realm) is None:
                return (f" (set registry_auth for {other}, the token service of {host}, in "
                        f"the service configuration: credentials only go to the host they "
                        f"are set for)")
            return ""
        return f" (set registry_auth for {host} in the service configuration)" \
            if self._basic is None else ""

    def _authenticate(self, challenge: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic" and self._basic:
            self._use_basic = True
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(f"unauthorized: authentication required{self._hint()}")
        realm = params["realm"]
        parts = urlsplit(realm)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if params.get("service"):
            query.append(("service", params["service"]))
        for scope in (params.get("scope") or "").split():
            query.append(("scope", scope))
        url = urlunsplit(parts._replace(query=urlencode(query)))
        resp = self._send("GET", url, None, None, origin_of(realm),
                          self._credentials_for(realm))
        with resp:
            if resp.status_code >= 400:
                raise RegistryError(f"{resp.status_code}: {error_text(resp)}"
                                    f"{self._hint(realm)}")
            try:
                raw = read_body(resp, TOKEN_CAP)
            except TooLarge:
                raise RegistryError(f"the token service {realm} answered with more than "
                                    f"{TOKEN_CAP >> 10} KiB (a token is a few): refused") \
                    from None
        try:
            body = json.loads(raw)
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
        body = error_text(resp)
        resp.close()
        if resp.status_code == 404:
            raise RegistryError("file does not exist")
        if resp.status_code in (401, 403):
            raise RegistryError(f"unauthorized: access denied{self._hint()}")
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

def check_blob_entries(blobs: list[Any], prefix: str) -> None:
    """RegistryError (``prefix`` first) unless every entry has a size and a sha256 digest of
    exactly 64 lowercase hex digits: a digest names a file in the store and a URL on the
    registry, so ``sha256:../../x`` (CVE-2024-37032) or a stray newline never reaches either."""
    for blob in blobs:
        if not isinstance(blob, dict) or not isinstance(blob.get("size"), int) or \
                isinstance(blob["size"], bool) or blob["size"] < 0:
            raise RegistryError(f"{prefix}a layer has no size")
        digest = blob.get("digest")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise RegistryError(f"{prefix}unsupported digest {digest!r} (only sha256 is, as "
                                f"sha256: and 64 lowercase hex digits)")


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
    check_blob_entries(blobs, "pull model manifest: ")
    if not any(layer.get("mediaType") == MEDIA_PREFIX + "model" for layer in layers):
        raise RegistryError("pull model manifest: no model layer (application/vnd.ollama."
                            "image.model): this is not an Ollama model")
    return manifest, blobs


class BlobSizeError(RegistryError):
    """A registry sent a blob of another size than its manifest gives: never retried, and
    the partial file goes (it can never become right)."""


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
            except BlobSizeError:
                partial.close()
                partial.path.unlink(missing_ok=True)
                raise
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
    """One GET from ``partial.offset`` to the end (or until the connection drops). Never more
    than the manifest's size is read; an answer that says (or shows, by a framed end) that the
    blob has another size raises BlobSizeError."""
    headers = {"Range": f"bytes={partial.offset}-"} if partial.offset else {}
    resp = client.request("GET", url, headers=headers)
    digest = f"sha256:{partial.hex}"

    def wrong_size(got: str) -> BlobSizeError:
        return BlobSizeError(f"blob {digest}: the registry sent {got} where the manifest says "
                             f"{partial.size} bytes: refused, and the partial download "
                             f"removed (the registry's blob or its manifest is wrong)")

    with resp:
        if resp.status_code == 416:  # the partial file is longer than the blob
            partial.restart()
            transfer.completed = 0
            return
        client.check(resp, 200, 206)
        start = 0
        if resp.status_code == 206:
            match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)",
                             resp.headers.get("Content-Range", ""))
            start = int(match.group(1)) if match else -1
            if match and match.group(3) != "*" and int(match.group(3)) != partial.size:
                raise wrong_size(f"a blob of {match.group(3)} bytes")
        if start != partial.offset:  # a full answer (no range support): start again
            partial.restart()
            if start != 0:
                raise RegistryError(f"the registry answered a range request with bytes from "
                                    f"{start}; expected {partial.offset}")
        expected = partial.size - partial.offset
        length = resp.headers.get("Content-Length", "")
        if _content_coding(resp) is None and length.isdigit() and int(length) != expected:
            raise wrong_size(f"{partial.offset + int(length)} bytes")
        try:
            for data in iter_body(resp, expected):
                if transfer.cancel.is_set():
                    raise Cancelled()
                partial.write(data)
                transfer.completed = partial.offset
        except TooLarge:
            raise wrong_size("more") from None
        # A cut connection raises above; an answer that ended by its own framing (its
        # length, or chunked encoding's last chunk) is the whole of what the registry has.
        framed = bool(getattr(resp.raw, "chunked", False) or length)
    if partial.offset < partial.size:
        if framed:
            raise wrong_size(f"{partial.offset} bytes")
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
        with resp:
            raw = read_body(resp, MANIFEST_CAP)
    except TooLarge:
        raise RegistryError(f"pull model manifest: the registry's answer is larger than "
                            f"{MANIFEST_CAP >> 20} MiB (a manifest is a few KiB): refused") \
            from None
    except RegistryError as exc:
        raise RegistryError(f"pull model manifest: {exc.message}") from None
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
        try:
            manifest = json.loads(raw)
        except ValueError:
            manifest = None
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(layers, list):
            raise RegistryError(f"the manifest of {name.short} is damaged: delete the model "
                                f"and create or pull it again")
        blobs = list(layers)
        if isinstance(manifest.get("config"), dict) and manifest["config"].get("digest"):
            blobs.append(manifest["config"])
        # Before any request: a digest names the file read and the URL sent to.
        check_blob_entries(blobs, f"the manifest of {name.short} is damaged (nothing was "
                                  f"sent; delete the model and create or pull it again): ")
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


__all__ = ["BlobSizeError", "DigestMismatch", "HostPolicy", "RegistryError", "RegistrySettings",
           "Remote", "check_blob_entries", "is_internal_address", "pull_model", "push_model",
           "parse_challenge", "parse_manifest"]
