"""The NVIDIA GPUs as /metrics, /health and the dashboard show them: memory, utilisation,
temperature and power per GPU, and the memory each process holds on them.

They are read through NVML (the ``nvidia-ml-py`` package, ``pynvml``: a few microseconds per
value, no process started) when it loads, else through ``nvidia-smi`` (tens of milliseconds per
call), and at most every ``GPU_TTL_S`` seconds. Without an NVIDIA GPU ``gpu_snapshot()`` is None
and the reason is logged once per process (at INFO; at DEBUG in a worker of several, whose engine
pool is the process that reports the GPUs in /metrics).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GPU_TTL_S = 5.0  # the dashboard polls every second; a GPU reading that old is fine


@dataclass
class GpuDevice:
    """One GPU: memory in MiB; utilisation 0..1, temperature in °C and power in W when the GPU
    reports them (None when it does not)."""

    index: int
    name: str
    used_mib: float
    total_mib: float
    utilization: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


@dataclass
class GpuSnapshot:
    """Every GPU, and the memory each process uses on them (pid → MiB)."""

    devices: list[GpuDevice]
    by_pid: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the dashboard and /health."""
        return {"devices": [{"index": d.index, "name": d.name, "used_mib": d.used_mib,
                             "total_mib": d.total_mib, "utilization": d.utilization,
                             "temperature_c": d.temperature_c, "power_w": d.power_w}
                            for d in self.devices],
                "by_pid": {str(pid): mib for pid, mib in self.by_pid.items()}}


# --- NVML ------------------------------------------------------------------------------------

def _load_pynvml() -> Any:
    import pynvml  # nvidia-ml-py; optional: without it, nvidia-smi

    return pynvml


def _or_none(read: Callable[[], Any]) -> Any:
    """``read()``, or None where the GPU does not support that value (NVML raises)."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and kin: the value is absent
        return None


def read_nvml(nvml: Any) -> GpuSnapshot | None:
    """Every GPU through an initialised NVML module (``pynvml`` or a stand-in); None when it
    lists none."""
    devices: list[GpuDevice] = []
    by_pid: dict[int, float] = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _or_none(lambda h=handle: nvml.nvmlDeviceGetName(h)) or f"GPU {index}"
        if isinstance(name, bytes):  # nvidia-ml-py before 11.515 returned bytes
            name = name.decode(errors="replace")
        memory = _or_none(lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h))
        rates = _or_none(lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h))
        temperature = _or_none(lambda h=handle: nvml.nvmlDeviceGetTemperature(
            h, nvml.NVML_TEMPERATURE_GPU))
        milliwatts = _or_none(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h))
        devices.append(GpuDevice(
            index=index, name=name,
            used_mib=memory.used / MIB if memory is not None else 0.0,
            total_mib=memory.total / MIB if memory is not None else 0.0,
            utilization=rates.gpu / 100.0 if rates is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_w=milliwatts / 1000.0 if milliwatts is not None else None))
        # A model split by tensor_split holds memory on several GPUs: summed per process.
        for proc in _or_none(lambda h=handle: nvml.nvmlDeviceGetComputeRunningProcesses(h)) or []:
            used = getattr(proc, "usedGpuMemory", None)  # None: not available (vGPU, WDDM)
            if used is not None:
                by_pid[int(proc.pid)] = by_pid.get(int(proc.pid), 0.0) + used / MIB
    return GpuSnapshot(devices, by_pid) if devices else None


# --- nvidia-smi ------------------------------------------------------------------------------

SMI_GPU_FIELDS = "index,name,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw"


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_gpu_csv(text: str, stats: bool = False) -> list[GpuDevice]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.used,memory.total
    --format=csv,noheader,nounits``; with ``stats``, the query of ``SMI_GPU_FIELDS`` (three
    more numbers: utilisation %, temperature °C, power W)."""
    numbers = 5 if stats else 2
    devices = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 + numbers:
            continue
        # A GPU name may hold commas: index first, the numbers last.
        index = _number(parts[0])
        if index is None:
            continue
        values = [_number(p) for p in parts[-numbers:]]
        device = GpuDevice(int(index), ", ".join(parts[1:-numbers]), values[0] or 0.0,
                           values[1] or 0.0)
        if stats:
            util, device.temperature_c, device.power_w = values[2:]
            device.utilization = util / 100.0 if util is not None else None
        devices.append(device)
    return devices


def parse_apps_csv(text: str) -> dict[int, float]:
    """Parse ``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``
    into pid → MiB (summed over GPUs: a model split by tensor_split uses several)."""
    out: dict[int, float] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        pid, mib = _number(parts[0]), _number(parts[1])
        if pid is None or mib is None:
            continue
        out[int(pid)] = out.get(int(pid), 0.0) + mib
    return out


def _run_smi(args: list[str]) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=3)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return None
    return done.stdout if done.returncode == 0 else None


def read_smi() -> tuple[GpuSnapshot | None, str]:
    """Ask nvidia-smi now: (the GPUs, "") or (None, why there are none)."""
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi not found"
    devices = parse_gpu_csv(_run_smi([f"--query-gpu={SMI_GPU_FIELDS}"]) or "", stats=True)
    if not devices:
        return None, "nvidia-smi lists no GPU"
    apps = parse_apps_csv(_run_smi(["--query-compute-apps=pid,used_memory"]) or "")
    return GpuSnapshot(devices, apps), ""


# --- the reader ------------------------------------------------------------------------------

class GpuReader:
    """Reads the GPUs through NVML when it loads, else nvidia-smi (``load_nvml`` and ``smi``
    are seams for tests).

    NVML is initialised once per process (again in a forked child). When neither finds a GPU,
    ``read()`` returns None and logs why once, not on every call.
    """

    def __init__(self, load_nvml: Callable[[], Any] = _load_pynvml,
                 smi: Callable[[], tuple[GpuSnapshot | None, str]] = read_smi) -> None:
        self._load_nvml = load_nvml
        self._smi = smi
        self._nvml: Any = None
        self._nvml_pid: int | None = None
        self._nvml_error = ""
        self._told = False
        self.no_gpu_level = logging.INFO
        self._lock = threading.Lock()

    def _nvml_module(self) -> Any:
        if self._nvml_pid != os.getpid():
            self._nvml_pid = os.getpid()
            self._nvml, self._nvml_error = None, ""
            try:
                nvml = self._load_nvml()
                nvml.nvmlInit()
                self._nvml = nvml
            except ImportError:
                self._nvml_error = "nvidia-ml-py is not installed"
            except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded
                self._nvml_error = f"NVML not found ({exc})"
        return self._nvml

    def read(self) -> GpuSnapshot | None:
        """Every GPU now; None without one (the reason logged on the first such read)."""
        with self._lock:
            why: list[str] = []
            snapshot = None
            nvml = self._nvml_module()
            if nvml is None:
                why.append(self._nvml_error)
            else:
                try:
                    snapshot = read_nvml(nvml)
                except Exception as exc:  # noqa: BLE001 - a reading must never fail a scrape
                    why.append(f"NVML failed ({exc})")
                else:
                    if snapshot is None:
                        why.append("NVML lists no GPU")
            if snapshot is None:
                snapshot, smi_why = self._smi()
                why.append(smi_why)
            if snapshot is None and not self._told:
                self._told = True
                log.log(self.no_gpu_level, "no NVIDIA GPU: %s; /metrics has no GPU series",
                        ", ".join(w for w in why if w))
            return snapshot


READER = GpuReader()
_cache_lock = threading.Lock()
_cache: tuple[float, GpuSnapshot | None] | None = None


def read_gpus() -> GpuSnapshot | None:
    """Read the GPUs now; None when there is no NVIDIA GPU."""
    return READER.read()


def gpu_snapshot() -> GpuSnapshot | None:
    """The GPUs and their memory, at most ``GPU_TTL_S`` seconds old; None without a GPU."""
    global _cache
    with _cache_lock:
        now = time.monotonic()
        if _cache is None or now - _cache[0] > GPU_TTL_S:
            _cache = (now, READER.read())
        return _cache[1]


def quiet_no_gpu() -> None:
    """Log the absence of a GPU at DEBUG in this process: a worker of several, whose engine
    pool says it (the pool renders /metrics)."""
    READER.no_gpu_level = logging.DEBUG
