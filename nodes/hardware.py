"""What this device has (CPU, memory, GPUs, ONNX Runtime providers) and how busy it is."""

from __future__ import annotations

import importlib.util
import logging
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import psutil

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    vendor: str
    name: str
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0


@dataclass(frozen=True)
class HardwareInfo:
    cpu_model: str
    physical_cores: int
    logical_cores: int
    cpu_max_mhz: float
    architecture: str
    memory_total_bytes: int
    memory_available_bytes: int
    os: str
    gpus: tuple[GpuInfo, ...] = ()
    onnx_providers: tuple[str, ...] = field(default=())

    @property
    def accelerators(self) -> tuple[str, ...]:
        """Coarse accelerator kinds, e.g. ("cuda",) or ("cpu",)."""
        kinds = {g.vendor.lower() for g in self.gpus}
        for provider in self.onnx_providers:
            name = provider.removesuffix("ExecutionProvider").lower()
            if name not in ("cpu", "azure"):
                kinds.add(name)
        return tuple(sorted(kinds)) or ("cpu",)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall back to platform's answer
        pass
    return platform.processor() or platform.machine()


def _nvidia_gpus() -> tuple[GpuInfo, ...]:
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,memory.used",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("nvidia-smi present but failed: %s", error)
        return ()
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            name, total, used = parts
            gpus.append(GpuInfo("nvidia", name, _mib(total), _mib(used)))
    return tuple(gpus)


_PROVIDERS_SCRIPT = "import onnxruntime as o; print(','.join(o.get_available_providers()))"


def _mib(value: str) -> int:
    """Bytes from nvidia-smi's MiB figure; 0 where it prints "[N/A]" (MIG, vGPU)."""
    try:
        return int(float(value)) * 1024 * 1024
    except ValueError:
        return 0


def _onnx_providers() -> tuple[str, ...]:
    """ONNX Runtime's execution providers, asked in a child process.

    Importing onnxruntime costs tens of MB that a node serving only GGUF models
    should not carry for its whole life, so the question is asked elsewhere.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROVIDERS_SCRIPT],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("could not list ONNX Runtime providers: %s", error)
        return ()
    return tuple(p for p in out.strip().split(",") if p)


def probe_hardware() -> HardwareInfo:
    """Probe once at start; takes well under a second."""
    memory = psutil.virtual_memory()
    frequency = None
    try:
        frequency = psutil.cpu_freq()
    except (OSError, NotImplementedError):  # some VMs and ARM boards expose no frequency
        frequency = None
    return HardwareInfo(
        cpu_model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        logical_cores=psutil.cpu_count() or 1,
        cpu_max_mhz=float(frequency.max or frequency.current) if frequency else 0.0,
        architecture=platform.machine(),
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        os=f"{platform.system()} {platform.release()}",
        gpus=_nvidia_gpus(),
        onnx_providers=_onnx_providers(),
    )


def system_load() -> tuple[float, float, int]:
    """(CPU %, memory %, memory available bytes) right now, without blocking."""
    memory = psutil.virtual_memory()
    return psutil.cpu_percent(interval=None), memory.percent, memory.available
