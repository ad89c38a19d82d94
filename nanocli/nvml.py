"""The local GPU's memory through NVML (nvidia-ml-py, ``import pynvml``), imported only when asked.

``query_device(index)`` returns a ``DeviceMemory`` or raises ``NvmlUnavailable`` (no nvidia-ml-py, no
NVML library, no driver, no GPU). ``nano fit-check --gpu auto`` calls it through a parameter, so tests
pass a fake function instead (any ``Callable[[int], DeviceMemory]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanocli_model.errors import NanoError


class NvmlUnavailable(NanoError):
    """NVML cannot tell us about a GPU here (library, driver or device missing)."""


class DeviceIndexError(NanoError):
    """``--device-index`` names a GPU this machine does not have."""


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU as NVML reports it, in bytes."""

    index: int
    name: str
    total: int
    free: int
    used: int
    api: str = "v2"  # "v2" (nvmlDeviceGetMemoryInfo_v2: used excludes driver-reserved memory) or "v1"


def _memory_info(pynvml, handle) -> tuple[object, str]:
    """The v2 memory info where the library and driver have it, else v1."""
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(handle, version=version), "v2"
        except (pynvml.NVMLError, TypeError, AttributeError):
            pass  # an older driver (FunctionNotFound / NotSupported) or an older nvidia-ml-py signature
    return pynvml.nvmlDeviceGetMemoryInfo(handle), "v1"


def query_device(index: int = 0) -> DeviceMemory:
    """Name, total, free and used memory of GPU ``index``, read through NVML."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("nvidia-ml-py (pynvml) is not installed") from None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError, or a broken library failing to load (OSError)
        raise NvmlUnavailable(f"NVML is not available ({e or type(e).__name__}): no NVIDIA driver or GPU "
                              "here") from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise NvmlUnavailable("NVML found no NVIDIA GPU")
        if not 0 <= index < count:
            raise DeviceIndexError(f"--device-index {index}: this machine has {count} GPU(s), "
                                   f"use 0..{count - 1}")
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        info, api = _memory_info(pynvml, handle)
    except (pynvml.NVMLError, UnicodeDecodeError, OSError) as e:
        raise NvmlUnavailable(f"NVML failed to read GPU {index} ({e or type(e).__name__}); check the driver with "
                              "nvidia-smi, or pass --gpu PROFILE") from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - shutting down after an answer (or an error) changes nothing
            pass
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return DeviceMemory(index=index, name=str(name), total=int(info.total), free=int(info.free),
                        used=int(info.used), api=api)
