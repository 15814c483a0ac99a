"""Noise-conditional classifiers (cld_fast.noise_classifier): trained on cf.perturb states they approach the
exact class posterior of a toy mixture; shapes; save / load; use in cf.ClassifierGuidance."""
import pytest
import torch

import cld_fast as cf
from cld_fast.noise_classifier import (NoiseClassifier, NoiseClassifierMLP, load_classifier, save_classifier,
                                       train_classifier)
from cld_fast.toy import GaussianMixture2D

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_data(gm, n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, gm.n_components, (n,), generator=g)
    x = (gm.means[y] + gm.std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()
    return x, y


def test_mlp_classifier_approaches_the_exact_posterior():
    """On perturbed states of a 3-Gaussian mixture the trained classifier's accuracy is within 0.04 of the
    Bayes classifier's (the exact p_t(y | u)), and its log-likelihood within 0.1 nats of it."""
    gm, sde = GaussianMixture2D(3, 1.0, 0.3), cf.CLD(beta0=1.0, beta1=7.0, m_inv=9.0)
    x, y = _toy_data(gm, 20000, 0)
    torch.manual_seed(0)
    clf = NoiseClassifierMLP(dim=2, num_classes=3, width=64)
    train_classifier(clf, x, y, sde, steps=600, batch_size=256, lr=3e-3, generator=torch.Generator().manual_seed(1))
    hx, hy = _toy_data(gm, 4000, 2)
    for t in (0.02, 0.2):
        tt = torch.full((4000,), t)
        u, _ = cf.perturb(hx, tt, sde, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = torch.log_softmax(clf(u, tt), 1)
        exact = gm.cld_class_log_posterior(u, tt, sde)
        acc = (got.argmax(1) == hy).double().mean().item()
        best = (exact.argmax(1) == hy).double().mean().item()
        nll, nll_best = -got.gather(1, hy[:, None]).mean().item(), -exact.gather(1, hy[:, None]).mean().item()
        print(t, acc, best, nll, nll_best)
        assert best - 0.04 < acc <= best + 0.02
        assert nll < nll_best + 0.1


def test_cnn_shapes_and_time_dependence():
    torch.manual_seed(0)
    for size in (8, 28):
        clf = NoiseClassifier(channels=1, num_classes=10, width=16, image_size=size).eval()
        u = torch.randn(3, 2, size, size)
        out = clf(u, torch.tensor([0.01, 0.5, 1.0]))
        assert out.shape == (3, 10)
        assert not torch.allclose(clf(u, torch.full((3,), 0.01)), clf(u, torch.full((3,), 0.9)))


def test_save_load_round_trip_and_bad_file(tmp_path):
    torch.manual_seed(0)
    clf = NoiseClassifier(channels=1, num_classes=10, width=16).eval()
    sde = cf.CLD(beta0=2.0, beta1=3.0)
    path = str(tmp_path / "cls.pt")
    save_classifier(clf, path, sde, steps=0)
    back, back_sde = load_classifier(path)
    u, t = torch.randn(2, 2, 8, 8), torch.tensor([0.1, 0.7])
    torch.testing.assert_close(back(u, t), clf(u, t), rtol=0, atol=0)
    assert back_sde == sde
    torch.save({"model": {}}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not a noise-conditional classifier"):
        load_classifier(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable classifier file"):
        load_classifier(str(tmp_path / "junk.pt"))


def test_trained_classifier_guides_a_network_score(toy_score_net):
    sde = cf.CLD()
    torch.manual_seed(0)
    clf = NoiseClassifierMLP(dim=2, num_classes=8, width=32)
    score = cf.score_fn(toy_score_net(width=16)(), sde)
    a = cf.sample(score, (64, 2), sde, steps=6, generator=torch.Generator().manual_seed(0),
                  guidance=cf.ClassifierGuidance(clf, 3, 2.0))
    b = cf.sample(score, (64, 2), sde, steps=6, generator=torch.Generator().manual_seed(0))
    assert a.nfe == b.nfe == 6 and torch.isfinite(a.u).all()
    assert not torch.allclose(a.u, b.u)
