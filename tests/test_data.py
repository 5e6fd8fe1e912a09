"""diffkd.data: IDX reader, Fashion-MNIST, CIFAR-100 (safe unpickling), ImageFolder, augmentation, loaders."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from diffkd.data import (CIFAR100, DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                         EpochShuffleSampler, FashionMNIST, InMemoryImageDataset, ShardSampler, TensorImageTransform,
                         build_datasets, build_loader, read_idx, sample_keys, subset)

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _IDX_CODES[big_endian.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + big_endian.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_fashion_mnist(root: Path, n_train: int = 12, n_test: int = 5) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count, gz in (("train", n_train, True), ("t10k", n_test, False)):  # gzipped and plain names
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (count, 28, 28), np.uint8), gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(count) % 10).astype(np.uint8), gz=gz)
    return root


# --- IDX ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-5, 0, 70000, 2 ** 31 - 1], dtype=np.int32),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    np.array([-3, 100], dtype=np.int16),
])
def test_read_idx_round_trip(tmp_path, array, gz):
    result = read_idx(write_idx(tmp_path / "f.idx", array, gz=gz))
    assert result.shape == array.shape and result.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable


def _truncated_gzip(payload: bytes) -> bytes:
    compressed = gzip.compress(payload)
    return compressed[: len(compressed) // 2]


_GOOD_PAYLOAD = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 3, 4) + bytes(range(12))


@pytest.mark.parametrize("content, message", [
    (_GOOD_PAYLOAD[:-1], "truncated"),
    (_GOOD_PAYLOAD + b"\x00", "trailing bytes"),
    (gzip.compress(_GOOD_PAYLOAD[:-3]), "truncated"),
    (_truncated_gzip(_GOOD_PAYLOAD * 50), "gzip"),
    (b"\x1f\x8b\x08\x00garbage", "gzip"),
    (b"\x01\x02\x08\x01" + _GOOD_PAYLOAD[4:], "first two bytes"),
    (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "dtype code 0x07"),
    (bytes([0, 0, 0x08, 3, 0, 0, 0, 1]), "truncated IDX header"),
    (b"\x00\x00", "too short"),
])
def test_read_idx_rejects_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --- Fashion-MNIST -----------------------------------------------------------------------------------------------

def test_fashion_mnist_from_generated_files(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm")
    train, test = FashionMNIST(root, train=True), FashionMNIST(root, train=False)
    assert (len(train), len(test)) == (12, 5)
    assert train.data.shape == (12, 28, 28) and train.data.dtype == torch.uint8
    assert train.images.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(train.data.numpy(), read_idx(root / "train-images-idx3-ubyte.gz"))
    assert test.targets.tolist() == [0, 1, 2, 3, 4] and train.classes[9] == "Ankle boot"
    image, label = train[11]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28) and int(label) == 1
    assert torch.equal(image[0], train.data[11])


def test_fashion_mnist_missing_folder_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST(missing)
    for expected in (str(missing), "apt-get install dataset-fashion-mnist", "--data-dir"):
        assert expected in str(info.value)
    root = write_fashion_mnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz nor t10k-labels-idx1-ubyte") as info:
        FashionMNIST(root, train=False)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_fashion_mnist_rejects_wrong_shapes(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), gz=True)
    with pytest.raises(ValueError, match="expected 12 uint8 labels"):
        FashionMNIST(root)
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((11, 32, 32), np.uint8), gz=True)
    with pytest.raises(ValueError, match="N×28×28"):
        FashionMNIST(root)


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(),
                    reason=f"{DEFAULT_FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files_and_statistics():
    train_ds, val_ds, info = build_datasets("fashion-mnist")
    assert train_ds.data.shape == (60000, 28, 28) and val_ds.data.shape == (10000, 28, 28)
    assert torch.bincount(train_ds.targets).tolist() == [6000] * 10
    assert torch.bincount(val_ds.targets).tolist() == [1000] * 10
    pixels = train_ds.images.double() / 255
    # The normalisation constants of the recipe are the training set's own statistics.
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST_MEAN[0], abs=5e-5)
    assert pixels.std().item() == pytest.approx(FASHION_MNIST_STD[0], abs=5e-5)
    assert info == dict(num_classes=10, in_chans=1, image_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


# --- CIFAR-100 ---------------------------------------------------------------------------------------------------

class Python2StylePickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` opcodes, as in the real CIFAR files (written by Python 2)."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        size = bytes([len(raw)]) if len(raw) < 256 else struct.pack("<i", len(raw))
        self.write((pickle.SHORT_BINSTRING if len(raw) < 256 else pickle.BINSTRING) + size + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str
    dispatch[str] = _save_python2_str


def python2_cifar_pickle(content: dict) -> bytes:
    buffer = io.BytesIO()
    Python2StylePickler(buffer, protocol=2).dump(content)
    # numpy 1.x, which wrote the real files, names numpy.core where numpy 2 names numpy._core.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar100(parent: Path, n_train: int = 10, n_test: int = 6, *, python2: bool = True) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def dump(name, content):
        data = python2_cifar_pickle(content) if python2 else pickle.dumps(
            {key.encode(): value for key, value in content.items()}, protocol=4)
        (folder / name).write_bytes(data)

    dump("meta", {"fine_label_names": [f"class_{i}" for i in range(100)],
                  "coarse_label_names": [f"super_{i}" for i in range(20)]})
    for name, count in (("train", n_train), ("test", n_test)):
        dump(name, {"filenames": [f"img_{i}.png" for i in range(count)], "batch_label": f"{name} batch",
                    "fine_labels": [(7 * i) % 100 for i in range(count)],
                    "coarse_labels": [i % 20 for i in range(count)],
                    "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)})
    return folder


@pytest.mark.parametrize("python2", [True, False], ids=["python2-file", "numpy2-protocol4"])
def test_cifar100_from_generated_pickles(tmp_path, python2):
    folder = write_cifar100(tmp_path, python2=python2)
    raw = pickle.loads((folder / "train").read_bytes(), encoding="bytes")[b"data"]
    for root in (tmp_path, folder):  # the parent of cifar-100-python, or the folder itself
        train, test = CIFAR100(root, train=True), CIFAR100(root, train=False)
        assert (len(train), len(test)) == (10, 6) and train.root == folder
        assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
        assert train.targets.tolist() == [(7 * i) % 100 for i in range(10)]
        assert train.classes[42] == "class_42"
        # Rows hold the red, green and blue planes one after another, each row-major.
        assert train.images[3, 1, 2, 5].item() == raw[3, 1024 + 2 * 32 + 5]


class _RunsShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload_kind", ["os.system", "builtins.eval", "numpy.load"])
def test_cifar100_refuses_malicious_pickles_without_running_them(tmp_path, payload_kind):
    folder = write_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    payloads = {
        "os.system": pickle.dumps({"data": _RunsShellCommand(marker)}, protocol=2),
        "builtins.eval": f"cbuiltins\neval\n(V__import__('pathlib').Path({str(marker)!r}).touch()\ntR.".encode(),
        "numpy.load": b"cnumpy\nload\n(V" + str(marker).encode() + b"\ntR.",
    }
    (folder / "train").write_bytes(payloads[payload_kind])
    with pytest.raises(ValueError, match="refusing to load the global") as info:
        CIFAR100(tmp_path)
    assert str(folder / "train") in str(info.value)
    assert payload_kind.split(".")[1] in str(info.value)
    assert not marker.exists()


def test_cifar100_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        CIFAR100(tmp_path / "data")
    for expected in (str(tmp_path / "data"), "cifar-100-python.tar.gz", "--data-dir", "train, test and meta"):
        assert expected in str(info.value)
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tar xzf"):
        CIFAR100(archive)
    folder = write_cifar100(tmp_path / "ok")
    (folder / "test").unlink()
    with pytest.raises(FileNotFoundError, match="test is missing"):
        CIFAR100(folder, train=False)
    (folder / "train").write_bytes(python2_cifar_pickle({"data": np.zeros((2, 100), np.uint8),
                                                         "fine_labels": [0, 1]}))
    with pytest.raises(ValueError, match="N×3072"):
        CIFAR100(folder)
    (folder / "train").write_bytes(python2_cifar_pickle({"data": np.zeros((2, 3072), np.uint8)})[:-20])
    with pytest.raises(ValueError, match="not a valid CIFAR python-format pickle"):
        CIFAR100(folder)


# --- augmentation ------------------------------------------------------------------------------------------------

def _candidate_views(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image, flipped or not: the only outputs a random crop + flip may give."""
    _, height, width = image.shape
    padded = F.pad(image, (padding,) * 4)
    crops = [padded[:, y:y + height, x:x + width] for y in range(2 * padding + 1) for x in range(2 * padding + 1)]
    return crops + [crop.flip(-1) for crop in crops]


def test_crop_and_flip_outputs_are_crops_of_the_padded_image():
    images = torch.randint(1, 256, (200, 3, 8, 6), dtype=torch.uint8)  # no zeros, so padding is recognisable
    transform = TensorImageTransform((0.0,) * 3, (1 / 255,) * 3, crop_padding=2, horizontal_flip=True)
    out = transform(images, sample_keys(seed=3, epoch=0, indices=np.arange(200)))
    assert out.shape == images.shape and out.dtype == torch.float32
    chosen = []
    for image, result in zip(images, out.round().to(torch.uint8)):
        matches = [i for i, view in enumerate(_candidate_views(image, 2)) if torch.equal(view, result)]
        assert matches, "output is not a crop of the zero-padded image"
        chosen.append(matches[0])
    assert len(set(chosen)) > 40  # all 25 offsets × 2 flips are reachable, and the draws spread over them
    assert 60 < sum(choice >= 25 for choice in chosen) < 140


def test_normalisation_only_transform():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    out = TensorImageTransform(mean, std)(images, sample_keys(0, 0, range(4)))
    expected = (images.double() / 255 - torch.tensor(mean, dtype=torch.double).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.double).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 channels but mean/std have 1"):
        TensorImageTransform((0.5,), (0.5,))(images, sample_keys(0, 0, range(4)))


def _augmented_dataset(n: int = 16, seed: int = 0) -> InMemoryImageDataset:
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
    transform = TensorImageTransform((0.5,) * 3, (0.25,) * 3, crop_padding=2, horizontal_flip=True)
    return InMemoryImageDataset(images, torch.arange(n) % 4, ["a", "b", "c", "d"], transform, augment_seed=seed)


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    dataset = _augmented_dataset()
    batch = torch.stack([image for image, _ in dataset.__getitems__([3, 5, 9])])
    assert torch.equal(batch[1], dataset[5][0])  # independent of the batch a sample lands in
    assert torch.equal(batch, torch.stack([image for image, _ in _augmented_dataset().__getitems__([3, 5, 9])]))
    assert torch.equal(dataset[-1][0], dataset[15][0])
    dataset.set_epoch(1)
    assert not torch.equal(batch, torch.stack([image for image, _ in dataset.__getitems__([3, 5, 9])]))
    other_seed = _augmented_dataset(seed=1)
    assert not torch.equal(batch, torch.stack([image for image, _ in other_seed.__getitems__([3, 5, 9])]))
    with pytest.raises(IndexError):
        dataset[16]


# --- loaders -----------------------------------------------------------------------------------------------------

def _epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_training_loader_drops_the_last_batch_and_evaluation_keeps_it():
    dataset = _augmented_dataset(n=10)
    train = build_loader(dataset, 4, train=True)
    assert len(train) == 2 and [len(labels) for _, labels in _epoch_batches(train, 0)] == [4, 4]
    evaluation = build_loader(dataset, 4, train=False)
    assert [labels.tolist() for _, labels in evaluation] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]
    assert [len(labels) for _, labels in _epoch_batches(build_loader(dataset, 4, train=True, drop_last=False), 0)] \
        == [4, 4, 2]


def test_loader_errors():
    dataset = _augmented_dataset(n=10)
    with pytest.raises(ValueError, match="10 samples, fewer than one batch of 16"):
        build_loader(dataset, 16, train=True)
    with pytest.raises(ValueError, match="at least 2 samples per batch"):
        build_loader(dataset, 1, train=True)
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        build_loader(dataset, 2, train=True, distributed=True)
    assert len(build_loader(dataset, 16, train=False)) == 1


def test_training_order_and_augmentation_replay_by_epoch():
    first = build_loader(_augmented_dataset(n=24), 4, train=True, seed=7)
    epochs = [_epoch_batches(first, epoch) for epoch in range(3)]
    resumed = build_loader(_augmented_dataset(n=24), 4, train=True, seed=7)
    replayed = _epoch_batches(resumed, 2)  # a run resumed at epoch 2 sees exactly the same batches
    for (images, labels), (images_again, labels_again) in zip(epochs[2], replayed):
        assert torch.equal(images, images_again) and torch.equal(labels, labels_again)
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    other_seed = _epoch_batches(build_loader(_augmented_dataset(n=24), 4, train=True, seed=8), 2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(epochs[2], other_seed))
    with pytest.warns(UserWarning, match="iterated twice at epoch 2"):
        list(first)


def test_worker_processes_give_the_same_batches():
    dataset = _augmented_dataset(n=24)
    in_process = _epoch_batches(build_loader(dataset, 4, train=True, seed=3), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-only build may warn about pin_memory or fork
        with_workers = _epoch_batches(build_loader(dataset, 4, train=True, seed=3, num_workers=2), 1)
    assert len(in_process) == len(with_workers) == 6
    for (images, labels), (images_w, labels_w) in zip(in_process, with_workers):
        assert torch.equal(images, images_w) and torch.equal(labels, labels_w)


def test_samplers_partition_the_data_across_ranks():
    dataset = _augmented_dataset(n=10)
    shards = [list(ShardSampler(10, num_replicas=3, rank=rank)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))  # evaluation: every sample exactly once
    train_shards = []
    for rank in range(2):
        sampler = EpochShuffleSampler(dataset, num_replicas=2, rank=rank, seed=1)
        sampler.set_epoch(4)
        train_shards.append(list(sampler))
    assert sorted(train_shards[0] + train_shards[1]) == list(range(10))
    assert dataset.epoch == 4  # set_epoch reaches the dataset's augmentation


def test_distributed_loader_with_a_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        loader = build_loader(_augmented_dataset(n=10), 4, train=True, distributed=True, seed=2)
        assert isinstance(loader.sampler, EpochShuffleSampler) and len(loader) == 2
        plain = build_loader(_augmented_dataset(n=10), 4, train=True, seed=2)
        for (images, _), (images_plain, _) in zip(_epoch_batches(loader, 1), _epoch_batches(plain, 1)):
            assert torch.equal(images, images_plain)
    finally:
        torch.distributed.destroy_process_group()


# --- subsets -----------------------------------------------------------------------------------------------------

def test_subset_is_deterministic_and_class_balanced():
    targets = torch.tensor([0] * 30 + [1] * 10 + [2] * 3)
    images = torch.zeros(43, 1, 2, 2, dtype=torch.uint8)
    transform = TensorImageTransform((0.5,), (0.5,))
    dataset = InMemoryImageDataset(images, targets, ["a", "b", "c"], transform)
    small = subset(dataset, 12, seed=1)
    assert isinstance(small, InMemoryImageDataset) and len(small) == 12 and small.transform is transform
    assert torch.bincount(small.targets).tolist() == [4, 5, 3] or torch.bincount(small.targets).tolist() == [5, 4, 3]
    assert torch.equal(small.targets, subset(dataset, 12, seed=1).targets)
    assert torch.bincount(subset(dataset, 9, seed=2).targets).tolist() == [3, 3, 3]
    wrapped = subset(TensorDataset(torch.arange(20.0)), 5, seed=0)
    assert isinstance(wrapped, Subset) and wrapped.indices == sorted(wrapped.indices) and len(set(wrapped.indices)) == 5
    with pytest.raises(ValueError, match=r"subset size must be in 1\.\.43"):
        subset(dataset, 44)


# --- recipes and ImageFolder -------------------------------------------------------------------------------------

def test_build_datasets_cifar100_recipe(tmp_path):
    write_cifar100(tmp_path)
    train_ds, val_ds, info = build_datasets("cifar100", tmp_path)
    assert info == dict(num_classes=100, in_chans=3, image_size=32, mean=(0.5071, 0.4867, 0.4408),
                        std=(0.2675, 0.2565, 0.2761))
    assert train_ds.transform.crop_padding == 4 and train_ds.transform.horizontal_flip
    assert not val_ds.transform.is_random
    image, _ = train_ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    plain_train, _, _ = build_datasets("cifar100", tmp_path, train_transform=False)
    assert not plain_train.transform.is_random
    with pytest.raises(ValueError, match="pass --data-dir"):
        build_datasets("cifar100")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of fashion-mnist, cifar100, imagenet"):
        build_datasets("mnist")


def test_build_datasets_fashion_mnist_from_a_data_dir(tmp_path):
    train_ds, val_ds, info = build_datasets("fashion-mnist", write_fashion_mnist(tmp_path / "fm"))
    assert train_ds.transform.crop_padding == 2 and train_ds.transform.horizontal_flip
    assert train_ds[0][0].shape == (1, 28, 28) and len(val_ds) == 5 and info["in_chans"] == 1


def write_image_folder(root: Path, split: str, classes: list[str], per_class: int = 2) -> None:
    rng = np.random.default_rng(2)
    for name in classes:
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_imagenet_recipe_on_an_image_folder(tmp_path):
    write_image_folder(tmp_path, "train", ["n01", "n02"])
    write_image_folder(tmp_path, "val", ["n01", "n02"], per_class=1)
    train_ds, val_ds, info = build_datasets("imagenet", tmp_path, augment_seed=4)
    assert info["num_classes"] == 2 and info["image_size"] == 224 and (len(train_ds), len(val_ds)) == (4, 2)
    rng_state = torch.get_rng_state()
    image, label = train_ds[3]
    assert image.shape == (3, 224, 224) and label == 1
    assert torch.equal(image, train_ds[3][0])  # the same draws for the same (seed, epoch, index)
    assert torch.equal(rng_state, torch.get_rng_state())  # and the caller's RNG is untouched
    train_ds.set_epoch(1)
    assert not torch.equal(image, train_ds[3][0])
    assert val_ds[0][0].shape == (3, 224, 224)
    smaller = subset(train_ds, 2, seed=0)
    assert sorted(smaller.targets) == [0, 1] and smaller[0][0].shape == (3, 224, 224)


def test_image_folder_layout_errors(tmp_path):
    write_image_folder(tmp_path, "train", ["n01", "n02"])
    with pytest.raises(FileNotFoundError, match="val is missing") as info:
        build_datasets("imagenet", tmp_path)
    assert "<data-dir>/val/<class>/<image>" in str(info.value)
    (tmp_path / "val").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "flat.png")  # validation images not sorted into classes
    with pytest.raises(FileNotFoundError, match="class folder"):
        build_datasets("imagenet", tmp_path)
    write_image_folder(tmp_path, "val", ["n01", "n03"])
    with pytest.raises(ValueError, match=r"only in train, first 5: \['n02'\]; only in val: \['n03'\]"):
        build_datasets("imagenet", tmp_path)
