import pickle
import random

import numpy as np
import pytest
import torch

from lightning_hessian.data import CIFAR10DataModule, MNIST1DDataModule, load_cifar10, load_mnist1d
from lightning_hessian.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD


def test_mnist1d_generated_cached_and_deterministic(data_dir):
    x, y, x_test, y_test = load_mnist1d(400, 100, seed=3, data_dir=data_dir)
    assert x.shape == (400, 40) and x_test.shape == (100, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    full = torch.cat([x, x_test])
    assert abs(full.mean().item()) < 1e-5 and abs(full.std().item() - 1) < 1e-3  # standardised
    cached = list(data_dir.glob("mnist1d_400_100_seed3.npz"))
    assert len(cached) == 1
    again = load_mnist1d(400, 100, seed=3, data_dir=data_dir)
    assert all(torch.equal(a, b) for a, b in zip((x, y, x_test, y_test), again))
    other = load_mnist1d(400, 100, seed=4, data_dir=data_dir)
    assert not torch.equal(x, other[0])


def test_mnist1d_generation_leaves_numpy_and_python_rngs_alone(tmp_path):
    np.random.seed(7)
    random.seed(7)
    expected = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    load_mnist1d(40, 10, seed=1, data_dir=tmp_path)  # the generator seeds both
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_datamodule_splits(data_dir):
    dm = MNIST1DDataModule(data_dir=str(data_dir), num_train=400, num_test=100, val_size=50, batch_size=32)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 350 and len(dm.val_set) == 50 and len(dm.test_set) == 100
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 40) and y.shape == (32,)
    lo, hi = dm.input_range
    assert lo < -1 and hi > 1


@pytest.mark.parametrize(
    "kwargs, match",
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"), ({"val_size": 500}, "val_size")],
)
def test_mnist1d_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNIST1DDataModule(num_train=400, num_test=100, **kwargs)


def test_mnist1d_batch_larger_than_data(data_dir):
    dm = MNIST1DDataModule(data_dir=str(data_dir), num_train=400, num_test=100, batch_size=1000)
    dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size=1000 exceeds the 400 training samples"):
        dm.train_dataloader()


def write_fake_cifar10(root, per_batch: int = 8, seed: int = 0):
    """Write a tiny folder in the standard ``cifar-10-batches-py`` pickle format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar10_reads_standard_folder(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    x, y, x_test, y_test = load_cifar10(tmp_path)
    assert x.shape == (40, 3, 32, 32) and x_test.shape == (8, 3, 32, 32)
    with open(folder / "data_batch_2", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    # row-major 3x32x32 layout: the first 1024 bytes are the red channel of image 0
    assert torch.equal(x[8, 0].flatten(), torch.as_tensor(entry[b"data"][0, :1024]))
    assert y[8:16].tolist() == entry[b"labels"]
    assert torch.equal(load_cifar10(folder)[0], x)  # the folder itself works too

    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, augment=False)
    dm.setup("fit")
    xb, _ = next(iter(dm.val_dataloader()))
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    expected = (x_test[0].float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    assert torch.allclose(xb[0], expected, atol=1e-6)
    # the attacks' valid range, per channel: pixel values 0 and 1 once standardised
    lo, hi = (torch.tensor(bound) for bound in dm.input_range)
    torch.testing.assert_close(lo, -mean / std)
    torch.testing.assert_close(hi, (1 - mean) / std)


def test_cifar10_augmentation_is_crop_and_flip(tmp_path):
    write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, augment=True)
    dm.setup("fit")
    source = dm.train_set.images[0]
    # padding is black in the raw image (RandomCrop before Normalize): -mean / std once normalised
    black = (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)).view(3, 1, 1)
    padded = torch.nn.functional.pad(source - black, (4, 4, 4, 4)) + black
    windows = {(i, j): padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)}
    matched = set()
    for seed in range(5):
        torch.manual_seed(seed)
        image, _ = dm.train_set[0]
        assert image.shape == (3, 32, 32)
        hits = {k for k, w in windows.items()
                if torch.allclose(image, w, atol=1e-6) or torch.allclose(image, w.flip(-1), atol=1e-6)}
        assert hits
        matched |= hits
    assert matched - {(4, 4)}  # some crop reaches into the padding


def test_cifar10_augmented_batches_depend_on_seed_and_epoch_only(tmp_path):
    # crops and flips drawn from the global RNG (which a checkpoint does not restore) made a resumed epoch
    # train on other images than the uninterrupted run
    write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=40, augment=True)
    dm.setup("fit")

    def first_batch(epoch, global_seed, workers=0):
        torch.manual_seed(global_seed)
        loader = dm.train_dataloader()
        loader = torch.utils.data.DataLoader(loader.dataset, 40, sampler=loader.sampler, num_workers=workers)
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[0]

    reference = first_batch(3, global_seed=0)
    assert torch.equal(reference, first_batch(3, global_seed=1))
    assert torch.equal(reference, first_batch(3, global_seed=2, workers=2))
    assert not torch.equal(reference, first_batch(4, global_seed=0))


def test_cifar10_missing_folder_names_the_path(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*data.data_dir"):
        dm.prepare_data()


def test_training_order_depends_on_seed_and_epoch_only(data_dir):
    dm = MNIST1DDataModule(data_dir=str(data_dir), num_train=400, num_test=100, batch_size=400)
    dm.setup("fit")

    def first_batch(epoch, global_seed):
        torch.manual_seed(global_seed)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[1]

    assert torch.equal(first_batch(3, global_seed=0), first_batch(3, global_seed=1))
    assert not torch.equal(first_batch(3, global_seed=0), first_batch(4, global_seed=0))
    assert sorted(first_batch(0, 0).tolist()) == sorted(dm.train_set.tensors[1].tolist())  # a permutation


@pytest.mark.parametrize("num_train, num_test", [(1500, 1100), (33, 7), (7, 3), (400, 100)])
def test_mnist1d_split_sizes_are_exact(num_train, num_test, tmp_path):
    x, y, x_test, y_test = load_mnist1d(num_train, num_test, seed=0, data_dir=tmp_path)
    assert (len(x), len(y), len(x_test), len(y_test)) == (num_train, num_train, num_test, num_test)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_train": 0}, "num_train must be a positive integer, got 0"),
     ({"num_train": 1005}, "num_train \\+ num_test must be a multiple of 10")],
)
def test_mnist1d_datamodule_checks_sizes_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNIST1DDataModule(**{"num_test": 100, **kwargs})


def test_mnist1d_training_order_follows_shuffle_seed_with_the_same_data(data_dir):
    def first_batch(**kwargs):
        dm = MNIST1DDataModule(data_dir=str(data_dir), num_train=400, num_test=100, batch_size=400, **kwargs)
        dm.setup("fit")
        return dm.train_set.tensors[0], next(iter(dm.train_dataloader()))[0]

    (data_a, order_a), (data_b, order_b), (_, order_c) = first_batch(), first_batch(shuffle_seed=1), first_batch(
        shuffle_seed=42)
    assert torch.equal(data_a, data_b) and not torch.equal(order_a, order_b) and torch.equal(order_a, order_c)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_train": -1}, "num_train must be a positive integer, got -1"),
     ({"num_test": 0}, "num_test must be a positive integer, got 0")],
)
def test_cifar10_checks_split_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


def test_cifar10_split_larger_than_the_folder_names_the_argument(tmp_path):
    write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), num_test=9)
    with pytest.raises(ValueError, match="num_test=9 exceeds the 8 samples"):
        dm.setup("fit")
