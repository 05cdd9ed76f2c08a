"""Frozen-prefix feature cache: the output of the frozen VGG16 layers, computed once and stored on disk.

While no random augmentation is applied, every layer below the lowest trainable
one is a fixed function of the input image. Its output is computed once per
key (data, base weights, input size, preprocessing, precision and cut layer)
and stored as a memory-mapped ``.npy`` file under the study folder. Every fold,
trial and worker process that trains above the same cut shares that file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sweep.config import Config, FloatRange
from sweep.errors import SweepError
from sweep.model import BASE_LAYERS, cut_layer

logger = logging.getLogger(__name__)

# Bump when the way features are computed changes, so old files are not reused.
CACHE_FORMAT = 1
GIB = 1024**3
# Output channels of each VGG16 block.
BLOCK_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


@dataclass(frozen=True)
class CacheKey:
    """Everything the stored features depend on, apart from the cut layer."""

    data: str  # Dataset.fingerprint()
    weights: str  # SHA-256 of the base weights
    input_size: int  # pixels
    preprocessing: str  # name of the preprocessing function
    precision: str  # Keras dtype policy the prefix ran under

    def digest(self, cut: str) -> str:
        """Return a short hash of the key, the cut layer and the cache format."""
        text = json.dumps({**asdict(self), "cut": cut, "format": CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(arrays: list[np.ndarray] | None) -> str:
    """Return a SHA-256 over the base weight arrays."""
    digest = hashlib.sha256()
    for array in arrays or []:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def feature_shape(cut: str, input_size: int) -> tuple[int, int, int]:
    """Return the (height, width, channels) output of base layer ``cut`` for square inputs of ``input_size``."""
    block = int(cut[len("block")])
    pools = block if cut.endswith("_pool") else block - 1
    side = input_size
    for _ in range(pools):
        side //= 2
    return side, side, BLOCK_CHANNELS[block]


def cuts_for_config(config: Config) -> list[str]:
    """Return the cut layers a study with this search space can train above, in base order."""
    spec = config.search.unfreeze_layers
    low, high = (spec.low, spec.high) if isinstance(spec, FloatRange) else (spec, spec)
    cuts = {cut_layer(1, 0)} | {cut_layer(2, int(n)) for n in range(int(low), int(high) + 1)}
    cuts.discard(None)
    return [name for name in BASE_LAYERS if name in cuts]


def required_bytes(cuts: list[str], n_images: int, input_size: int) -> int:
    """Return the disk that float32 features of ``cuts`` need for ``n_images`` images."""
    return sum(n_images * math.prod(feature_shape(cut, input_size)) * 4 for cut in cuts)


def check_budget(config: Config, n_images: int) -> None:
    """Raise SweepError when the cache of every reachable cut would exceed ``cache.max_gb``."""
    if not config.cache.enabled or config.train.augment:
        return
    cuts = cuts_for_config(config)
    need = required_bytes(cuts, n_images, config.model.input_size)
    if need > config.cache.max_gb * GIB:
        raise SweepError(
            f"cache.max_gb must be >= {need / GIB:.2f} for {n_images} images at {config.model.input_size} px "
            f"with search.unfreeze_layers reaching {cuts[0]}, but got {config.cache.max_gb}; "
            "raise it, narrow search.unfreeze_layers, or set cache.enabled=false"
        )


class FeatureCache:
    """Stored outputs of frozen base prefixes for one study.

    Args:
        folder: Directory of the ``.npy`` files, usually ``<study dir>/features``.
        key: What the features depend on besides the cut layer.
        together: Cuts computed in one pass: when one of them is missing, every
            missing one is stored, since the deepest prefix passes through the others.
    """

    def __init__(self, folder: Path, key: CacheKey, together: Sequence[str] = ()) -> None:
        self.folder = folder
        self.key = key
        self.together = tuple(together)

    def path(self, cut: str) -> Path:
        return self.folder / f"{cut}-{self.key.digest(cut)}.npy"

    def get(self, cut: str, n_images: int, fill: Callable[[dict[str, np.memmap]], None]) -> np.ndarray:
        """Return the read-only memory-mapped features of ``cut``, computing them first if needed.

        Args:
            cut: Base layer whose output is stored.
            n_images: Number of images (rows).
            fill: Writes the features of all images of each cut it is given into that cut's array.
        """
        path = self.path(cut)
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._lock():
                # Another worker may have written it while this one waited for the lock.
                missing = [c for c in dict.fromkeys((*self.together, cut)) if not self.path(c).exists()]
                if missing:
                    self._build(missing, n_images, fill)
        features = np.load(path, mmap_mode="r")
        if features.shape[0] != n_images:
            raise RuntimeError(f"feature cache {path} has {features.shape[0]} rows, expected {n_images}")
        return features

    def _build(self, cuts: list[str], n_images: int, fill: Callable[[dict[str, np.memmap]], None]) -> None:
        arrays: dict[str, np.memmap] = {}
        for cut in cuts:
            for stale in self.folder.glob(f"{cut}-*.npy"):
                logger.info("removing feature cache %s, whose key no longer matches", stale.name)
                stale.unlink()
            partial = self.path(cut).with_suffix(".partial.npy")
            arrays[cut] = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n_images, *feature_shape(cut, self.key.input_size)))
        try:
            fill(arrays)
            for cut, array in arrays.items():
                array.flush()
                shape = array.shape
                del array
                path = self.path(cut)
                os.replace(path.with_suffix(".partial.npy"), path)
                path.with_suffix(".json").write_text(json.dumps({**asdict(self.key), "cut": cut, "shape": shape}, indent=1), encoding="utf-8")
                logger.info("stored %s features %s in %s (%.1f MiB)", cut, shape, path.name, path.stat().st_size / 2**20)
        finally:
            arrays.clear()
            for cut in cuts:
                self.path(cut).with_suffix(".partial.npy").unlink(missing_ok=True)

    def total_bytes(self) -> int:
        """Return the size of all stored feature files."""
        return sum(p.stat().st_size for p in self.folder.glob("*.npy")) if self.folder.exists() else 0

    def _lock(self) -> AbstractContextManager[None]:
        return exclusive_lock(self.folder / ".lock")


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, created if missing, so that one process at a time runs the block."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
