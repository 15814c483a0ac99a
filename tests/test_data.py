"""Data: toy sets, CIFAR-10 python format (a fake one in tmp_path), npz, image folders, errors, sharding."""
import math
import os
import pickle

import numpy as np
import pytest
import torch

from cld_fast import data as D
from cld_fast.config import TrainConfig
from cli_helpers import cli, one_line_error


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_fake_cifar(root, n_per_batch=12, batches=(1, 2), test=True):
    """A tiny cifar-10-batches-py in the real format: pickled dicts with bytes keys, (N, 3072) uint8 rows."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {}
    names = [f"data_batch_{i}" for i in batches] + (["test_batch"] if test else [])
    for name in names:
        arr = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        entry = {b"batch_label": name.encode(), b"labels": list(rng.integers(0, 10, n_per_batch).tolist()),
                 b"data": arr, b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
        images[name] = arr
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10}, f, protocol=2)
    return folder, images


def test_swissroll_matches_the_official_construction():
    gen = torch.Generator().manual_seed(0)
    x = D.SwissRoll().sample(20000, generator=gen)
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    centers = torch.tensor(D.SwissRoll.OFFSETS)
    comp = torch.cdist(x, centers).argmin(1)
    frac = torch.bincount(comp, minlength=5).float() / len(x)
    assert torch.allclose(frac, torch.full((5,), 0.2), atol=0.02)
    # each roll: radius t * 0.01 with t in [1.5 pi, 4.5 pi] (+ small noise)
    r = (x - centers[comp]).norm(dim=1)
    assert r.min() > 1.5 * math.pi * 0.01 - 0.01 and r.max() < 4.5 * math.pi * 0.01 + 0.01
    # same generator state, same samples (on-the-fly but reproducible)
    assert torch.equal(D.SwissRoll().sample(100, torch.Generator().manual_seed(3)),
                       D.SwissRoll().sample(100, torch.Generator().manual_seed(3)))


def test_gmm_toy_source():
    x = D.make_toy("gmm").sample(1000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1000, 2)
    assert abs(float(x.norm(dim=1).mean()) - 0.7) < 0.05
    with pytest.raises(D.DataError, match="unknown toy"):
        D.make_toy("moons")


def test_cifar10_loader_reads_the_python_format(tmp_path):
    folder, images = _write_fake_cifar(str(tmp_path))
    x = D.load_cifar10(str(tmp_path))  # parent folder works
    y = D.load_cifar10(folder)         # the batches folder itself works
    assert x.shape == (24, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, y)
    expect = np.concatenate([images["data_batch_1"], images["data_batch_2"]]).reshape(-1, 3, 32, 32)
    assert np.array_equal(x.numpy(), expect)
    t = D.load_cifar10(folder, split="test")
    assert t.shape == (12, 3, 32, 32)


def test_cifar10_source_batches_are_centred_and_flipped(tmp_path):
    _write_fake_cifar(str(tmp_path))
    cfg = TrainConfig(data="cifar10", data_path=str(tmp_path), batch_size=8, model="tiny", random_flip=True)
    src = D.build_data(cfg, "cpu")
    assert src.is_image and src.shape == (3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    b = src.next(0, gen)
    assert b.shape == (8, 3, 32, 32) and b.dtype == torch.float32
    assert float(b.min()) >= -1.0 and float(b.max()) <= 1.0
    raw = D.load_cifar10(str(tmp_path))[torch.tensor(src.sampler.batch(0))].float() / 255 * 2 - 1
    flipped = raw.flip(-1)
    same = [(torch.equal(b[i], raw[i]) or torch.equal(b[i], flipped[i])) for i in range(8)]
    assert all(same)


def test_cifar10_missing_path_explains_layout(tmp_path):
    with pytest.raises(D.DataError) as info:
        D.load_cifar10(str(tmp_path / "nowhere"))
    msg = str(info.value)
    assert "does not exist" in msg and "cifar-10-batches-py" in msg and "data_batch_1" in msg
    assert "cs.toronto.edu" in msg and "Nothing is downloaded" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no CIFAR-10 batches"):
        D.load_cifar10(str(tmp_path / "empty"))
    with pytest.raises(D.DataError, match="needs --data-path"):
        D.load_cifar10(None)


def test_cifar10_bad_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"this is not a pickle")
    with pytest.raises(D.DataError, match="not a CIFAR-10 python batch"):
        D.load_cifar10(str(tmp_path))
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8)}, f, protocol=2)
    with pytest.raises(D.DataError, match=r"\(N, 3072\)"):
        D.load_cifar10(str(tmp_path))
    # anything beyond numpy arrays in the pickle is refused (no arbitrary code on load)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f, protocol=2)
    with pytest.raises(D.DataError, match="refusing to unpickle"):
        D.load_cifar10(str(tmp_path))


def test_npz_images_vectors_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", images=hwc)
    t, is_u8 = D.load_npz(str(tmp_path / "hwc.npz"))
    assert is_u8 and t.shape == (10, 3, 8, 8)
    assert np.array_equal(t.numpy(), hwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "gray.npz", x=rng.integers(0, 256, size=(5, 6, 6), dtype=np.uint8))
    assert D.load_npz(str(tmp_path / "gray.npz"))[0].shape == (5, 1, 6, 6)
    vec = rng.normal(size=(50, 2)).astype(np.float32)
    np.savez(tmp_path / "vec.npz", data=vec, other=np.zeros(3))
    t, is_u8 = D.load_npz(str(tmp_path / "vec.npz"))
    assert not is_u8 and t.shape == (50, 2)
    src = D.build_data(TrainConfig(data="npz", data_path=str(tmp_path / "vec.npz"), batch_size=8), "cpu")
    assert src.shape == (2,) and not src.is_image and src.next(0, None).shape == (8, 2)

    with pytest.raises(D.DataError, match="not found"):
        D.load_npz(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="not a readable"):
        D.load_npz(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "two.npz", a=vec, b=vec)
    with pytest.raises(D.DataError, match="--npz-key"):
        D.load_npz(str(tmp_path / "two.npz"))
    with pytest.raises(D.DataError, match="has no array 'c'"):
        D.load_npz(str(tmp_path / "two.npz"), key="c")
    np.savez(tmp_path / "int.npz", x=np.zeros((4, 2), np.int64))
    with pytest.raises(D.DataError, match="uint8 images or floating-point"):
        D.load_npz(str(tmp_path / "int.npz"))
    np.savez(tmp_path / "nan.npz", x=np.full((4, 2), np.nan, np.float32))
    with pytest.raises(D.DataError, match="NaN"):
        D.load_npz(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "small.npz", x=vec[:3])
    with pytest.raises(D.DataError, match="fewer than one batch"):
        D.build_data(TrainConfig(data="npz", data_path=str(tmp_path / "small.npz"), batch_size=8), "cpu")


def test_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 20), (16, 16), (20, 50), (33, 31)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / ("sub" if i % 2 else "") / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    ds = D.ImageFolder(str(root), size=16)
    assert len(ds) == 4
    assert all(ds[i].shape == (3, 16, 16) and ds[i].dtype == torch.uint8 for i in range(4))
    cfg = TrainConfig(data="folder", data_path=str(root), image_size=16, batch_size=2, num_workers=0, model="tiny")
    src = D.build_data(cfg, "cpu")
    batches = [src.next(s, torch.Generator().manual_seed(s)) for s in range(5)]  # crosses an epoch
    assert all(b.shape == (2, 3, 16, 16) for b in batches)
    assert float(torch.stack(batches).abs().max()) <= 1.0

    with pytest.raises(D.DataError, match="not found"):
        D.ImageFolder(str(tmp_path / "missing"), size=16)
    (tmp_path / "none").mkdir()
    with pytest.raises(D.DataError, match="no images"):
        D.ImageFolder(str(tmp_path / "none"), size=16)
    with pytest.raises(D.DataError, match="--image-size"):
        D.ImageFolder(str(root), size=None)
    (root / "broken.png").write_bytes(b"not a png")
    broken = D.ImageFolder(str(root), size=16, validate=False)  # a file that goes bad after the check
    with pytest.raises(D.DataError, match="could not read image"):
        broken[broken.files.index(str(root / "broken.png"))]


def test_sampler_is_sharded_and_a_function_of_the_step():
    n, bs = 103, 5
    s0 = D.ResumableSampler(n, bs, rank=0, world_size=2, seed=1)
    s1 = D.ResumableSampler(n, bs, rank=1, world_size=2, seed=1)
    per_epoch = s0.batches_per_epoch
    assert per_epoch == (n // 2) // bs
    e0 = [i for s in range(per_epoch) for i in s0.batch(s)]
    e1 = [i for s in range(per_epoch) for i in s1.batch(s)]
    assert not set(e0) & set(e1)                   # ranks see disjoint items
    assert len(set(e0)) == len(e0) == per_epoch * bs
    fresh = D.ResumableSampler(n, bs, rank=0, world_size=2, seed=1)
    assert fresh.batch(per_epoch + 3) == s0.batch(per_epoch + 3)   # random access = resume
    assert s0.batch(per_epoch) != s0.batch(0)      # a new permutation each epoch
    assert s0.state_dict(per_epoch + 3) == {"epoch": 1, "batch": 3, "seed": 1, "world_size": 2, "n": n}


def test_unknown_data_and_indivisible_batch():
    with pytest.raises(D.DataError, match="unknown data"):
        D.build_data(TrainConfig(data="mnist"), "cpu")
    with pytest.raises(D.DataError, match="divisible"):
        D.build_data(TrainConfig(batch_size=5), "cpu", rank=0, world_size=2)


def test_center_uncenter():
    torch.manual_seed(100)  # this test draws from the global RNG
    x = torch.rand(10)
    assert torch.allclose(D.uncenter(D.center(x)), x)
    assert float(D.center(torch.tensor(0.0))) == -1.0 and float(D.center(torch.tensor(1.0))) == 1.0


# ---- unreadable images are found before training -----------------------------------------------------


def _image_folder(root, n=4, size=12):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_corrupt_image_fails_before_training_naming_the_file(tmp_path, capsys):
    from cld_fast import data as D

    root = _image_folder(tmp_path / "imgs")
    good = (root / "0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])  # a valid header, cut short
    (root / "junk.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(D.DataError, match=r"could not decode image '.*junk.jpg'.*\(and 1 more bad file\(s\)\).*--bad-images skip"):
        D.ImageFolder(str(root), size=8)
    with pytest.warns(RuntimeWarning, match="skipping 2 unreadable image"):
        ds = D.ImageFolder(str(root), size=8, bad_images="skip")
    assert len(ds) == 4 and sorted(os.path.basename(f) for f, _ in ds.skipped) == ["junk.jpg", "truncated.png"]
    with pytest.raises(D.DataError, match="bad_images must be one of"):
        D.ImageFolder(str(root), size=8, bad_images="ignore")

    run = str(tmp_path / "run")
    args = ("train", "--data", "folder", "--data-path", str(root), "--image-size", "8", "--model", "tiny",
            "--out", run, "--steps", "1", "--batch-size", "2", "--no-progress", "--device", "cpu")
    rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "junk.jpg")
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))  # stopped before training
    (root / "junk.jpg").unlink()
    (root / "truncated.png").unlink()
    (root / "empty.png").write_bytes(b"")
    rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "empty.png")


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    grey16 = rng.integers(0, 65536, size=(8, 8), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    grey8 = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    folder = D.ImageFolder(str(tmp_path), size=8, channels=1)
    got = {os.path.basename(f): folder[i][0].numpy() for i, f in enumerate(folder.files)}
    want16 = np.rint(grey16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)  # independent: v / 257
    np.testing.assert_array_equal(got["g16.png"], want16)
    np.testing.assert_array_equal(got["g8.png"], grey8)
    assert (got["g16.png"] == 255).mean() < 0.05  # not clipped to white
    rgb = D.ImageFolder(str(tmp_path), size=8, channels=3)
    np.testing.assert_array_equal(rgb[rgb.files.index(str(tmp_path / "g16.png"))].numpy(), np.stack([want16] * 3))


def test_fifo_in_an_image_folder_is_never_opened(tmp_path):
    import threading

    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    result = {}

    def open_folder(policy):
        try:
            result[policy] = D.ImageFolder(str(tmp_path), size=8, bad_images=policy)
        except Exception as exc:  # noqa: BLE001
            result[policy] = exc

    for policy in ("fail", "skip"):
        th = threading.Thread(target=open_folder, args=(policy,), daemon=True)
        th.start()
        th.join(20)
        if th.is_alive():  # unblock the reader, then fail
            with open(tmp_path / "pipe.png", "wb") as w:
                w.close()
            pytest.fail("opening the image folder blocked on a FIFO")
    assert isinstance(result["fail"], D.DataError)
    assert "pipe.png" in str(result["fail"]) and "FIFO" in str(result["fail"])
    assert result["skip"].files == [str(tmp_path / "ok.png")]


def test_npz_odd_arrays_name_the_file(tmp_path):
    p = str(tmp_path / "two.npz")
    np.savez(p, x=np.zeros((4, 8, 8, 2), np.uint8))
    with pytest.raises(D.DataError, match=r"two\.npz.*\(4, 8, 8, 2\).*channel"):
        D.load_npz(p)
    p = str(tmp_path / "obj.npz")
    np.savez(p, x=np.array([1, "a"], dtype=object))
    with pytest.raises(D.DataError, match=r"obj\.npz.*pickle"):
        D.load_npz(p)


def test_data_path_that_is_a_file(tmp_path):
    (tmp_path / "f.npz").write_bytes(b"x")
    with pytest.raises(D.DataError, match="is a file, not a folder"):
        D.ImageFolder(str(tmp_path / "f.npz"), size=8)


def test_worker_error_is_the_workers_one_line_message():
    exc = D.DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                      '  File "x.py", line 1, in f\ncld_fast.data.DataError: could not read image \'a.png\': gone')
    assert D._worker_message(exc) == "could not read image 'a.png': gone"


def test_images_vanishing_mid_run_give_one_line(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    cfg = TrainConfig(data="folder", data_path=str(tmp_path), image_size=8, batch_size=2, num_workers=1,
                      model="tiny", device="cpu")
    src = D.build_data(cfg, "cpu")
    src.next(0, torch.Generator().manual_seed(0))
    for i in range(4):
        os.unlink(tmp_path / f"{i}.png")
    with pytest.raises(D.DataError) as info:
        for step in range(1, 4):
            src.next(step, torch.Generator().manual_seed(0))
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg and "could not read image" in msg


def test_npz_path_that_is_a_fifo_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "d.npz")
    with pytest.raises(D.DataError, match="not a regular file"):
        D.load_npz(str(tmp_path / "d.npz"))
