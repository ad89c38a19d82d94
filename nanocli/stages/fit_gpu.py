"""Step 3 of ``nano fit-check``: what the estimate is judged against, in bytes.

``--gpu`` is a GPU profile (``a10g``, any case, or an alias such as ``h100``), a memory size (``24GiB``,
``24GB``, ``16G``: an ad-hoc card with the profiles' 5% framework share and nothing reserved), or ``auto``: the
local GPU's *free* memory through NVML. ``--reserve GiB`` replaces what the profile keeps for other models
(the A10G profile's 1.3 GiB for a vision encoder; ``--reserve 0`` frees it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from nanocli_model.errors import NanoError

from .. import nvml
from ..profiles import (
    GpuProfile,
    ProfileError,
    UnknownProfile,
    gpu_profile_for_device,
    load_gpu_profile,
    profile_names,
)

GIB = 2**30
# A memory size and no profile, or --gpu auto: the same share for the framework + CUDA context as every shipped
# GPU profile (the report's 5%).
FRAMEWORK_SHARE = 0.05
# GiB / Gi / G: 2^30 (G alone is binary, as every figure nano prints and `free -g`); GB: 10^9; M and T alike.
_SIZE = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))\s*([kmgt])(i?)(b?)", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}
SIZE_HINT = "a memory size such as 24GiB (2^30 bytes each; G alone is GiB too) or 24GB (10^9)"


class FitCheckError(NanoError):
    """A fit-check request that cannot be answered as given (bad value, no GPU to ask, a reservation larger than
    the GPU)."""


@dataclass(frozen=True)
class GpuLimit:
    """What the estimate is judged against, in bytes."""

    source: str  # "profile" | "size" | "nvml"
    name: str
    total: int  # the GPU's memory
    available: int  # profile or size: total; NVML: free memory now
    framework: int  # kept for the serving framework + CUDA context
    reserved: int  # kept for other models on the same GPU
    framework_share: float
    device_index: int | None = None
    nvml_api: str | None = None
    reserved_for: str | None = None  # the profile's reason for its reservation (a10g: a vision encoder)
    reserve_given: bool = False  # --reserve replaced the profile's reservation
    profile_reserved: int = 0  # what the profile itself reserves (shown when --reserve replaces it)
    bf16: bool | None = None  # False: no bf16 arithmetic (the profile says so); None: not known
    vendor_memory_gb: float | None = None

    @property
    def budget(self) -> int:
        """Bytes left for the model: available - framework - reserved (A10G profile: 19.66 GiB)."""
        return self.available - self.framework - self.reserved


def parse_size(text: str) -> int | None:
    """``24GiB`` / ``24Gi`` / ``24G`` -> 24 x 2^30, ``24GB`` -> 24 x 10^9 (K, M, T alike), in bytes; None when
    ``text`` is not written as a size (then it names a profile). Zero or below is a ``FitCheckError``."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        return None
    number, prefix, binary, b = m.groups()
    value = float(number)
    base = 1024 if binary or not b else 1000
    if not value > 0:
        raise FitCheckError(f"--gpu {text}: a memory size must be more than 0; write it like 24GiB or 24GB")
    if not value < 1e15:
        raise FitCheckError(f"--gpu {text[:20]}...: too large for a GPU's memory; write it like 24GiB or 24GB")
    return round(value * base ** _POWER[prefix.lower()])


def profile_limit(profile: GpuProfile, reserve_gib: float | None = None) -> GpuLimit:
    total = round(profile.memory_gib * GIB)
    own = round(profile.reserved_gib * GIB)
    return GpuLimit(source="profile", name=profile.name, total=total, available=total,
                    framework=round(total * profile.framework_overhead),
                    reserved=own if reserve_gib is None else round(reserve_gib * GIB),
                    framework_share=profile.framework_overhead, reserved_for=profile.reserved_for,
                    reserve_given=reserve_gib is not None, profile_reserved=own, bf16=profile.bf16,
                    vendor_memory_gb=profile.vendor_memory_gb)


def size_limit(text: str, total: int, reserve_gib: float | None = None) -> GpuLimit:
    return GpuLimit(source="size", name=text.strip(), total=total, available=total,
                    framework=round(total * FRAMEWORK_SHARE), reserved=round((reserve_gib or 0) * GIB),
                    framework_share=FRAMEWORK_SHARE, reserve_given=reserve_gib is not None)


def nvml_limit(device: nvml.DeviceMemory, reserve_gib: float | None = None) -> GpuLimit:
    try:  # the profile of this card, for what NVML does not say (T4: no bf16)
        profile = gpu_profile_for_device(device.name)
    except ProfileError:
        profile = None
    return GpuLimit(source="nvml", name=device.name, total=device.total, available=device.free,
                    framework=round(device.total * FRAMEWORK_SHARE), reserved=round((reserve_gib or 0) * GIB),
                    framework_share=FRAMEWORK_SHARE, device_index=device.index, nvml_api=device.api,
                    reserve_given=reserve_gib is not None, bf16=None if profile is None else profile.bf16)


def resolve_gpu(gpu: str, device_index: int, query: Callable[[int], nvml.DeviceMemory] | None = None,
                reserve_gib: float | None = None) -> GpuLimit:
    """``auto``: the local GPU through NVML (``query``, replaceable in tests); a size; else a GPU profile."""
    if gpu.strip().lower() == "auto":
        query = query or nvml.query_device
        try:
            limit = nvml_limit(query(device_index), reserve_gib)
        except nvml.NvmlUnavailable as e:
            known = ", ".join(profile_names("gpus")) or "none"
            raise FitCheckError(f"--gpu auto found no GPU to read: {e}. Pass --gpu PROFILE, one of: {known}; or "
                           f"{SIZE_HINT}") from None
    else:
        size = parse_size(gpu)
        if size is not None:
            limit = size_limit(gpu, size, reserve_gib)
        else:
            try:
                limit = profile_limit(load_gpu_profile(gpu), reserve_gib)
            except UnknownProfile as e:
                raise FitCheckError(f"--gpu: {e}; or {SIZE_HINT}") from None
    if limit.reserve_given and limit.total - limit.framework - limit.reserved <= 0:
        raise FitCheckError(f"--reserve {reserve_gib:g}: leaves nothing for the model: {limit.name} has "
                       f"{(limit.total - limit.framework) / GIB:.2f} GiB after the {limit.framework_share:.0%} "
                       "framework share; reserve less")
    return limit
