"""Offline datasets: scikit-learn's digits and MNIST-style IDX files.

Nothing here downloads. Loaders validate what they read and raise
`DatasetError` (or `DatasetMissing`) with a message a user can act on, never a
bare numpy or gzip exception. Decoded arrays are cached per process and
returned read-only, so a hundred simulated clients in one worker share one copy
and none of them can corrupt it.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

#: Debian's folder, unless FEDGE_FASHION_MNIST_DIR names another (a machine without the
#: package that carries the files, e.g. scripts/gpu_scenario.sh's `.data/fashion-mnist`)
DEFAULT_FASHION_MNIST_DIR = Path(os.environ.get("FEDGE_FASHION_MNIST_DIR")
                                 or "/usr/share/datasets/fashion-mnist")

FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_LABELS: tuple[str, ...] = tuple(str(i) for i in range(10))

Split = Literal["train", "test"]

# IDX type codes -> numpy dtype (big-endian where it matters)
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class DatasetError(ValueError):
    """A dataset file exists but is not what it claims to be (truncated, wrong magic...)."""


class DatasetMissing(DatasetError, FileNotFoundError):
    """The dataset's files are not where we looked; the message says how to get them."""


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# ---------------------------------------------------------------- digits


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits: x float32 [N,1,8,8] in [0,1], y int64 [N].

    Bundled with scikit-learn, so it works on a device with no network.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    return _readonly(x), _readonly(y)


# ---------------------------------------------------------------- IDX


def _read_file_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a complete gzip file ({e})") from e


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one IDX blob (magic, big-endian uint32 dims, row-major data), checking lengths."""
    if len(data) < 4:
        raise DatasetError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{source}: bad IDX magic {data[:4].hex()} (must start with 0000); not an IDX file"
        )
    type_code, ndim = data[2], data[3]
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        raise DatasetError(f"{source}: unknown IDX data type 0x{type_code:02x}")
    if ndim == 0:
        raise DatasetError(f"{source}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{source}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DatasetError(
            f"{source}: {what}: dims {dims} need {expected} data bytes, file has {got}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find(folder: Path, prefix: str, kind: str, idx_dims: int) -> Path | None:
    """First existing spelling: `train-images-idx3-ubyte[.gz]` or `train-images.idx3-ubyte[.gz]`."""
    for stem in (f"{prefix}-{kind}-idx{idx_dims}-ubyte", f"{prefix}-{kind}.idx{idx_dims}-ubyte"):
        for suffix in ("", ".gz"):
            p = folder / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def _missing_message(name: str, folder: Path, missing: list[str]) -> str:
    wanted = ", ".join(
        f"{p}-{k}-idx{d}-ubyte[.gz]"
        for p in ("train", "t10k")
        for k, d in (("images", 3), ("labels", 1))
    )
    where = f"{folder} does not exist" if not folder.is_dir() else f"missing {', '.join(missing)}"
    return (
        f"{name} IDX files not found in {folder} ({where}): install Debian's "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data-dir "
        f"(run config 'data-dir') with {wanted}"
    )


def idx_paths(
    folder: Path | str = DEFAULT_FASHION_MNIST_DIR,
    split: Split = "train",
    *,
    name: str = "Fashion-MNIST",
) -> tuple[Path, Path]:
    """The (images, labels) files of `split` in `folder`, else `DatasetMissing` saying why."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = Path(folder).expanduser()
    prefix = _SPLIT_PREFIX[split]
    images = _find(folder, prefix, "images", 3)
    labels = _find(folder, prefix, "labels", 1)
    if images is None or labels is None:
        missing = [
            f"{prefix}-{kind}-idx{d}-ubyte[.gz]"
            for kind, d, p in (("images", 3, images), ("labels", 1, labels))
            if p is None
        ]
        raise DatasetMissing(_missing_message(name, folder, missing))
    return images, labels


@functools.lru_cache(maxsize=8)
def _load_idx_cached(
    images: Path, labels: Path, _stamp: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    x = parse_idx(_read_file_bytes(images), str(images))
    y = parse_idx(_read_file_bytes(labels), str(labels))
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DatasetError(
            f"{images}: expected uint8 images [N,rows,cols], got {x.dtype} {x.shape}"
        )
    if y.ndim != 1 or y.dtype != np.uint8:
        raise DatasetError(f"{labels}: expected uint8 labels [N], got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return _readonly(np.ascontiguousarray(x)), _readonly(y.astype(np.int64))


def load_idx_raw(
    folder: Path | str = DEFAULT_FASHION_MNIST_DIR,
    split: Split = "train",
    *,
    name: str = "Fashion-MNIST",
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded IDX split as stored: images uint8 [N,rows,cols], labels int64 [N].

    Cached per process (keyed by path, size and mtime); a quarter of the float32
    size, so partitions can be cut from it before converting.
    """
    images, labels = idx_paths(folder, split, name=name)
    si, sl = images.stat(), labels.stat()
    stamp = (si.st_size, si.st_mtime_ns, sl.st_size, sl.st_mtime_ns)
    return _load_idx_cached(images.resolve(), labels.resolve(), stamp)


def images_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [N,rows,cols] -> float32 [N,1,rows,cols] in [0,1], the models' input."""
    out = images.astype(np.float32)
    out *= 1.0 / 255.0
    return out.reshape(images.shape[0], 1, *images.shape[1:])


def load_idx(
    folder: Path | str = DEFAULT_FASHION_MNIST_DIR,
    split: Split = "train",
    *,
    name: str = "Fashion-MNIST",
) -> tuple[np.ndarray, np.ndarray]:
    """An MNIST-style IDX split (plain or .gz): x float32 [N,1,28,28] in [0,1], y int64 [N].

    Raises `DatasetMissing` when the files are absent and `DatasetError` when
    they are malformed. The uint8 decode is cached; this returns a fresh float copy.
    """
    x, y = load_idx_raw(folder, split, name=name)
    return images_to_float(x), y
