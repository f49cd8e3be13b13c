"""What llama-server says about where a model went, read from its log while it loads.

llama-server (run with ``-lv 4``) names every device it uses, the memory each one has free,
the buffers it puts there (weights, KV cache, compute), how many layers it offloaded and what
``--fit`` decided. ``LoadReport.feed(line)`` reads those lines one at a time (pure, no I/O);
``devices()`` gives the per-device view that /api/ps, /metrics and the dashboard show.

Lines it reads (the pinned llama.cpp's wording)::

    llama_prepare_model_devices: using device RPC0 (127.0.0.1:50061) (unknown id) - 24105 MiB free
    load_tensors: offloaded 31/31 layers to GPU
    load_tensors:   CPU_Mapped model buffer size =    28.69 MiB
    load_tensors: RPC0[127.0.0.1:50061] model buffer size =    16.91 MiB
    llama_kv_cache: RPC0[127.0.0.1:50061] KV buffer size =     3.00 MiB
    sched_reserve: CUDA0 compute buffer size =    18.91 MiB
    common_params_fit_impl:   - RPC0 (127.0.0.1:50061):  4 layers,     52 MiB used,  24052 MiB free
    llama_context: n_ctx                 = 2048
    ggml_aligned_malloc: insufficient memory (attempted to allocate 87890.62 MB)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_USING = re.compile(r"using device (\S+) \(([^)]*)\)(?: \([^)]*\))? - (\d+) MiB free")
_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute) buffer size =\s+([\d.]+) MiB")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_FIT_DEVICE = re.compile(r"common_params_fit_impl:\s+- (\S+) \(([^)]*)\):\s+(\d+) layers,")
_FIT_CHANGE = re.compile(r"(?:common_params_fit_impl|common_fit_params): ((?:cannot meet|"
                         r"context size reduced|entire model|failed to fit).*)")
_N_CTX = re.compile(r"llama_context: n_ctx\s+= (\d+)")
_NO_MEMORY = re.compile(r"insufficient memory \(attempted to allocate ([\d.]+) MB\)|"
                        r"failed to allocate (\S+) buffer of size (\d+)")
_HOST = ("CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host", "CPU_AARCH64")
_KIND_KEY = {"model": "weights_mib", "KV": "kv_mib", "compute": "compute_mib"}


def _split_buffer_name(name: str) -> tuple[str, str | None]:
    """``RPC0[127.0.0.1:50061]`` → ("RPC", "127.0.0.1:50061"); ``CUDA0`` → ("CUDA0", None)."""
    if "[" in name and name.endswith("]"):
        base, endpoint = name[:-1].split("[", 1)
        return base.rstrip("0123456789"), endpoint
    return name, None


@dataclass
class Device:
    """One device a model runs on: a local GPU, a remote RPC device, or this host's CPU."""

    name: str
    endpoint: str | None = None  # host:port of an RPC worker; None for local devices
    description: str = ""
    weights_mib: float = 0.0
    kv_mib: float = 0.0
    compute_mib: float = 0.0
    free_mib: float | None = None
    layers: int | None = None  # what --fit chose for this device

    @property
    def is_host(self) -> bool:
        """True for this machine's own memory (CPU buffers, pinned host buffers)."""
        return self.name == "CPU"

    def to_dict(self) -> dict[str, Any]:
        """The /api/ps form."""
        return {"name": self.name, "endpoint": self.endpoint,
                "weights_mib": round(self.weights_mib, 2), "kv_mib": round(self.kv_mib, 2),
                "compute_mib": round(self.compute_mib, 2),
                "free_mib": None if self.free_mib is None else round(self.free_mib, 2)}


@dataclass
class LoadReport:
    """Where one engine put a model, built line by line from its log."""

    devices_by_key: dict[str, Device] = field(default_factory=dict)
    layers_offloaded: int | None = None
    layers_total: int | None = None
    n_ctx: int | None = None
    fit_notes: list[str] = field(default_factory=list)
    memory_error: str | None = None  # what could not be allocated, when loading ran out

    def _device(self, name: str, endpoint: str | None) -> Device:
        if name in _HOST or name.startswith("CPU"):
            name, endpoint = "CPU", None
        key = endpoint or name
        dev = self.devices_by_key.get(key)
        if dev is None:
            dev = self.devices_by_key[key] = Device(name=name, endpoint=endpoint)
        return dev

    def feed(self, line: str) -> None:
        """Read one log line (anything else is ignored)."""
        if "MiB" in line or "MB" in line:
            m = _BUFFER.search(line)
            if m:
                base, endpoint = _split_buffer_name(m.group(1))
                dev = self._device(base, endpoint)
                key = _KIND_KEY[m.group(2)]
                setattr(dev, key, getattr(dev, key) + float(m.group(3)))
                return
            m = _USING.search(line)
            if m:
                name, desc, free = m.group(1), m.group(2), float(m.group(3))
                endpoint = desc if name.startswith("RPC") else None
                dev = self._device(name, endpoint)
                dev.name, dev.description, dev.free_mib = name, desc, free
                return
            m = _NO_MEMORY.search(line)
            if m and self.memory_error is None:
                if m.group(1):
                    self.memory_error = f"{float(m.group(1)) / 1024:.1f} GiB"
                else:
                    self.memory_error = (f"{int(m.group(3)) / 2**30:.1f} GiB on "
                                         f"{m.group(2)}")
                return
        m = _OFFLOADED.search(line)
        if m:
            self.layers_offloaded, self.layers_total = int(m.group(1)), int(m.group(2))
            return
        if "common_params_fit_impl" in line or "common_fit_params" in line:
            m = _FIT_DEVICE.search(line)
            if m:
                name, desc = m.group(1), m.group(2)
                self._device(name, desc if name.startswith("RPC") else None).layers = \
                    int(m.group(3))
                return
            m = _FIT_CHANGE.search(line)
            if m and len(self.fit_notes) < 20:
                self.fit_notes.append(m.group(1).strip())
            return
        m = _N_CTX.search(line)
        if m:
            self.n_ctx = int(m.group(1))

    def devices(self) -> list[dict[str, Any]]:
        """Every device with memory on it: remote ones first (in the engine's order), CPU last."""
        devs = [d for d in self.devices_by_key.values()
                if d.weights_mib or d.kv_mib or d.compute_mib]
        devs.sort(key=lambda d: d.is_host)
        return [d.to_dict() for d in devs]

    def offloaded_bytes(self) -> int:
        """Bytes outside this host's memory (GPU and RPC devices): /api/ps ``size_vram``."""
        mib = sum(d.weights_mib + d.kv_mib + d.compute_mib
                  for d in self.devices_by_key.values() if not d.is_host)
        return int(mib * 1024 * 1024)

    def offload(self) -> dict[str, Any]:
        """What was offloaded and what ``--fit`` decided (for /api/ps and the log)."""
        per_device = {(d.endpoint or d.name): d.layers for d in self.devices_by_key.values()
                      if d.layers is not None}
        offloaded = any(not d.is_host for d in self.devices_by_key.values())
        return {"layers": self.layers_offloaded if offloaded else 0,
                "layers_total": self.layers_total,
                "context_length": self.n_ctx, "fit_layers": per_device or None,
                "fit_notes": self.fit_notes or None}
