"""Choice of the Keras dtype policy: bfloat16 where the hardware has bfloat16 matrix units."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

# CPU flags (Linux /proc/cpuinfo) of native bfloat16 matrix instructions:
# Intel AMX tiles and AVX-512 BF16 dot products.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# NVIDIA GPUs compute bfloat16 natively from compute capability 8.0 (Ampere).
BF16_GPU_CAPABILITY = (8, 0)


def cpu_flags() -> set[str]:
    """Return the CPU feature flags from /proc/cpuinfo, or an empty set where it is unavailable."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def choose_precision(setting: str, flags: set[str], gpu_capabilities: list[tuple[int, int]]) -> str:
    """Return the dtype policy for ``train.precision``; ``auto`` decides from the hardware given.

    ``auto`` gives ``mixed_bfloat16`` when a GPU is present and every GPU has compute
    capability 8.0 or newer, or when there is no GPU and the CPU has AMX-BF16 or
    AVX512-BF16; otherwise ``float32``. Other settings are returned unchanged.
    """
    if setting != "auto":
        return setting
    if gpu_capabilities:
        return "mixed_bfloat16" if all(c >= BF16_GPU_CAPABILITY for c in gpu_capabilities) else "float32"
    return "mixed_bfloat16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "float32"


@cache
def resolve_precision(setting: str) -> str:
    """Return the dtype policy for ``train.precision`` on this machine."""
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        capabilities.append(tuple(capability) if capability else (0, 0))
    precision = choose_precision(setting, cpu_flags(), capabilities)
    logger.debug("train.precision %s resolves to %s", setting, precision)
    return precision
