"""``cld-fast sample CKPT --inpaint images.npz --mask mask.npz``: outputs and one-line user errors."""
import os

import numpy as np
import pytest

from cli_helpers import cli, one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official_cld_sgm")
CKPT = os.path.join(FIXTURES, "official_small_checkpoint.pth")
CONFIG = os.path.join(FIXTURES, "official_small_config.json")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def files(tmp_path):
    if not os.path.exists(CKPT):
        pytest.skip("official fixture checkpoint not present")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)  # (N, H, W, C), as cld-fast fid reads
    mask = np.ones((1, 3, 16, 16), np.float32)
    mask[..., 8:, :] = 0.0
    np.savez(tmp_path / "images.npz", x=images)
    np.savez(tmp_path / "mask.npz", mask=mask)
    np.savez(tmp_path / "bad_mask.npz", mask=mask * 2)
    return images, mask, str(tmp_path / "images.npz"), str(tmp_path / "mask.npz"), str(tmp_path / "bad_mask.npz")


def test_inpaint_writes_samples_holding_the_observed_pixels(tmp_path, capsys, files):
    images, mask, img_path, mask_path, _ = files
    rc, out, err = cli(capsys, "sample", CKPT, "--config", CONFIG, "--steps", "4", "--inpaint", img_path, "--mask",
                       mask_path, "--out", str(tmp_path / "o"))
    assert rc == 0, err
    npz = os.path.join(tmp_path, "o", "inpaint_sscs_4.npz")
    assert os.path.isfile(os.path.join(tmp_path, "o", "inpaint_sscs_4.png"))
    x = np.load(npz)["x"]
    want = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 * 2.0 - 1.0
    m = np.broadcast_to(mask, x.shape) != 0
    assert x.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(x[m], want[m], rtol=0, atol=1e-6)
    assert np.abs(x[~m] - want[~m]).max() > 1e-3  # the rest is sampled


@pytest.mark.parametrize("extra, needles", [
    (["--mask", "BAD"], ["--mask", "mask must hold only 0 and 1"]),
    ([], ["--inpaint and --mask go together"]),
    (["--mask", "MASK", "--method", "ode"], ["--method ode", "does not take condition="]),
    (["--mask", "MASK", "--n", "5"], ["--n 5", "number of items"]),
])
def test_inpaint_user_errors_are_one_line(tmp_path, capsys, files, extra, needles):
    _, _, img_path, mask_path, bad_path = files
    extra = [{"BAD": bad_path, "MASK": mask_path}.get(a, a) for a in extra]
    rc, out, err = cli(capsys, "sample", CKPT, "--config", CONFIG, "--steps", "3", "--inpaint", img_path, *extra,
                       "--out", str(tmp_path / "o"))
    one_line_error(rc, err, *needles)


def test_inpaint_shape_mismatch_names_the_file(tmp_path, capsys, files):
    _, _, _, mask_path, _ = files
    np.savez(tmp_path / "small.npz", x=np.zeros((2, 8, 8, 3), np.uint8))
    rc, out, err = cli(capsys, "sample", CKPT, "--config", CONFIG, "--steps", "3", "--inpaint",
                       str(tmp_path / "small.npz"), "--mask", mask_path, "--out", str(tmp_path / "o"))
    one_line_error(rc, err, "--inpaint", "small.npz", "(3, 16, 16)")
