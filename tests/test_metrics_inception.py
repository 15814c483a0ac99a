"""Inception FID from local files (``cld-fast fid``): a randomly initialised Inception-v3 saved to disk
stands in for the real weights; any attempt to download fails the test."""
import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

from cld_fast import metrics as M  # noqa: E402
from cld_fast.cli import main  # noqa: E402


@pytest.fixture
def random_inception(tmp_path, monkeypatch):
    """The path of a randomly initialised torch-fidelity Inception-v3 state dict; downloads raise."""
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for mod in net.modules():  # He init keeps activations alive through the ~90 layers, so features differ
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    path = tmp_path / "inception_random.pth"
    torch.save(net.state_dict(), path)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return str(path)


def _images(n, seed, shift=0):
    g = np.random.default_rng(seed)
    return np.clip(g.integers(0, 200, size=(n, 1, 16, 16)) + shift, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_cli_fid_from_local_weights_and_statistics(random_inception, tmp_path, capsys):
    ref, fake = tmp_path / "ref.npz", tmp_path / "fake.npz"
    np.savez(ref, x=_images(6, 0))
    x = _images(5, 1, shift=50)
    np.savez(fake, x=(x.astype(np.float32) / 127.5 - 1.0))  # float in [-1, 1], as cld-fast sample writes
    stats = tmp_path / "ref_stats.npz"
    assert main(["fid", str(ref), "--inception", random_inception, "--save-stats", str(stats)]) == 0
    with np.load(stats) as z:
        mu, sigma = z["mu"], z["sigma"]
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    capsys.readouterr()
    assert main(["fid", str(fake), "--inception", random_inception, "--ref-stats", str(stats)]) == 0
    value = float(capsys.readouterr().out.split()[1])
    # independent path: the features of both sets, the Frechet formula on their statistics
    f_ref = M.inception_features(torch.from_numpy(_images(6, 0)), random_inception)
    f_fake = M.inception_features(torch.from_numpy(x), random_inception)
    expected = M.frechet_from_stats(*M.feature_stats(f_fake), *M.feature_stats(f_ref))
    assert value == pytest.approx(expected, rel=1e-4) and value > 1e-3


def test_cli_fid_user_errors(random_inception, tmp_path, capsys):
    imgs = tmp_path / "x.npz"
    np.savez(imgs, x=_images(3, 0))
    assert main(["fid", str(imgs), "--inception", str(tmp_path / "missing.pth"), "--save-stats", str(tmp_path / "s.npz")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad_stats.npz"
    np.savez(bad, mean=np.zeros(3))
    assert main(["fid", str(imgs), "--inception", random_inception, "--ref-stats", str(bad)]) == 2
    assert "'mu' and 'sigma'" in capsys.readouterr().err
    assert main(["fid", str(imgs), "--inception", random_inception]) == 2
    assert "--ref-stats" in capsys.readouterr().err
