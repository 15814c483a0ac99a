"""Offline image-quality metrics for the digit data sets, and Inception FID from local files.

Digit metrics (``digits`` 8x8, ``mnist5k`` 28x28; images float (N, 1, H, W) in [-1, 1]):

* **Frechet distance** between Gaussian fits of the features of a small classifier trained on the
  same data (:class:`DigitClassifier`; shipped weights in ``cld_fast/assets``, trained by
  ``bench/train_digit_classifier.py``), computed by torchmetrics' ``FrechetInceptionDistance`` with
  that classifier as its feature module (optional extra ``metrics``);
* the classifier's verdict on the samples: the fraction it labels with probability >= 0.9 (are
  they digits?) and the histogram of predicted classes (of every class?);
* a memorisation check: each sample's pixel distance (L2 in [-1, 1]) to its nearest training image,
  next to the same distance for held-out images.

:func:`digit_metrics` reports each metric for the samples against the held-out split and, as its
floor, for as many training images against the held-out split ("data vs. held-out data").

Inception FID (:func:`inception_features`, :func:`frechet_from_stats`, ``cld-fast fid``): the
torch-fidelity Inception-v3 from a local weight file (``pt_inception-2015-12-05-6726825d.pth``),
reference statistics from an ``.npz`` with ``mu`` and ``sigma``; nothing is downloaded.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["METRICS_EXTRA_HINT", "DigitClassifier", "ClassifierFeatures", "classifier_path", "load_classifier",
           "save_classifier", "frechet_distance", "classifier_report", "memorisation", "digit_metrics",
           "inception_features", "frechet_from_stats", "feature_stats"]

METRICS_EXTRA_HINT = "pip install 'cld_fast[metrics]' (or pip install torchmetrics)"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CONFIDENT = 0.9


# ------------------------------------------------------------------------------------------------
# The feature network
# ------------------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """A small CNN for grey square digits in [-1, 1]: ``forward`` (B, 1, S, S) -> logits (B, 10) float32.

    ``widths``: channels of the conv levels; each level is two 3x3 convs with ReLU and a 2x2 max
    pool (8x8: one level -> 4x4; 28x28: two levels -> 7x7). ``features(x)`` is the ``n_features``-dim
    layer before the last ReLU and linear layer: the Frechet distance's feature space.
    """

    def __init__(self, image_size: int, widths=(32,), n_features: int = 32):
        super().__init__()
        self.image_size, self.widths, self.n_features = int(image_size), tuple(int(w) for w in widths), int(n_features)
        layers, c, s = [], 1, self.image_size
        for w in self.widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, s = w, s // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(c * s * s, self.n_features)
        self.head = nn.Linear(self.n_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) images in [-1, 1] -> (B, n_features) float32."""
        return self.fc(self.body(x.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))

    def spec(self) -> dict:
        return {"image_size": self.image_size, "widths": list(self.widths), "n_features": self.n_features}


class ClassifierFeatures(nn.Module):
    """The feature module torchmetrics' FID calls: images (B, 1, S, S) in [-1, 1] -> (B, n_features)."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.n_features  # read by torchmetrics instead of a probe image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.features(x)


def classifier_path(data: str) -> str:
    """The shipped weight file of the classifier for ``data`` (``digits`` or ``mnist5k``)."""
    from .data import PACKAGED_DATASETS

    if data not in PACKAGED_DATASETS:
        raise ValueError(f"data must be one of {PACKAGED_DATASETS}, got {data!r}")
    return os.path.join(ASSETS, f"{data}_classifier.pt")


def save_classifier(net: DigitClassifier, path: str, **info) -> None:
    """Write ``net``'s weights (float32) with its architecture and ``info`` (e.g. held-out accuracy)."""
    state = {"spec": net.spec(), "state_dict": {k: v.detach().float().cpu() for k, v in net.state_dict().items()},
             "info": info}
    torch.save(state, path)


def load_classifier(data_or_path: str) -> DigitClassifier:
    """A :class:`DigitClassifier` in eval mode from ``digits``/``mnist5k`` (the shipped file) or a path."""
    path = data_or_path if os.path.isfile(str(data_or_path)) else classifier_path(data_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier weights {path!r} not found; train them with "
                                "python -m bench.train_digit_classifier")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitClassifier(**state["spec"])
    net.load_state_dict(state["state_dict"])
    net.info = dict(state.get("info", {}))
    return net.eval()


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def _fid_metric(feature: nn.Module):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as exc:
        raise ImportError(f"the Frechet distance uses torchmetrics: {METRICS_EXTRA_HINT}") from exc
    return FrechetInceptionDistance(feature=feature, reset_real_features=True)


def _batches(x: torch.Tensor, batch: int):
    for i in range(0, x.shape[0], batch):
        yield x[i:i + batch]


def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch: int = 500) -> float:
    """Frechet distance between the Gaussian fits of ``feature(real)`` and ``feature(fake)`` (torchmetrics).

    ``feature``: a module with an int ``num_features`` (e.g. :class:`ClassifierFeatures`); ``real``,
    ``fake``: image batches in the form ``feature`` takes, at least 2 each.
    """
    fid = _fid_metric(feature)
    for chunk in _batches(real, batch):
        fid.update(chunk, real=True)
    for chunk in _batches(fake, batch):
        fid.update(chunk, real=False)
    return float(fid.compute())


@torch.no_grad()
def classifier_report(classifier: DigitClassifier, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict:
    """What the classifier says about ``images`` (N, 1, S, S) in [-1, 1].

    Returns ``confident`` (fraction with top probability >= 0.9), ``mean_top_prob``, ``histogram``
    (fraction predicted as each class 0..9), ``min_class`` (the rarest class's fraction; 0.1 when
    balanced) and, with ``labels`` (N,) int, ``accuracy``.
    """
    probs = torch.cat([classifier(chunk).softmax(-1) for chunk in _batches(images, 1000)])
    top, pred = probs.max(-1)
    hist = torch.bincount(pred, minlength=10).double() / max(len(pred), 1)
    out = {"confident": float((top >= CONFIDENT).double().mean()), "mean_top_prob": float(top.double().mean()),
           "histogram": [round(float(h), 4) for h in hist], "min_class": float(hist.min())}
    if labels is not None:
        out["accuracy"] = float((pred == labels.to(pred.device)).double().mean())
    return out


def _nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(N,) L2 distance of each flattened query to its nearest row of ``bank`` (float64)."""
    q, b = queries.flatten(1).double(), bank.flatten(1).double()
    return torch.cat([torch.cdist(chunk, b).min(1).values for chunk in _batches(q, 500)])


def memorisation(train: torch.Tensor, heldout: torch.Tensor, samples: torch.Tensor) -> Dict:
    """Nearest-training-image distances of ``samples`` vs those of ``heldout`` images (all in [-1, 1]).

    Returns medians of both, their ratio (samples / held-out: near 1 means samples sit as far from
    the training set as new data does; far below 1 means copies), and ``copies``: the fraction of
    samples nearer to a training image than the 1st percentile of held-out images.
    """
    d_s, d_h = _nearest_distance(samples, train), _nearest_distance(heldout, train)
    q1 = torch.quantile(d_h, 0.01)
    med_s, med_h = float(d_s.median()), float(d_h.median())
    return {"median_nn_samples": med_s, "median_nn_heldout": med_h, "ratio": med_s / med_h,
            "copies": float((d_s < q1).double().mean())}


def digit_metrics(data: str, samples: torch.Tensor, seed: int = 0, classifier: Optional[DigitClassifier] = None) -> Dict:
    """Every digit metric of ``samples`` (N, 1, S, S) in [-1, 1] against the held-out split, and its floor.

    ``data``: ``digits`` or ``mnist5k``. The floor (``floor``) is the same metrics for N training
    images drawn without replacement (``seed``) against the held-out split. Returns
    ``{"n", "n_heldout", "fd", "classifier", "memorisation", "floor": {...}, "heldout_classifier"}``.
    """
    from .data import center, load_packaged

    clf = classifier or load_classifier(data)
    feat = ClassifierFeatures(clf)
    train_u8, _ = load_packaged(data, "train")
    held_u8, held_labels = load_packaged(data, "heldout")
    train, held = center(train_u8.float() / 255.0), center(held_u8.float() / 255.0)
    samples = samples.detach().float().cpu().clamp(-1.0, 1.0)
    n = samples.shape[0]
    if n > train.shape[0]:
        raise ValueError(f"samples: at most {train.shape[0]} images for data {data!r}, got {n}")
    idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    ref = train[idx]

    def block(x):
        return {"fd": frechet_distance(feat, held, x), "classifier": classifier_report(clf, x),
                "memorisation": memorisation(train, held, x)}

    # A training subset's nearest training image is itself: its memorisation floor is held-out vs train.
    floor = {"fd": frechet_distance(feat, held, ref), "classifier": classifier_report(clf, ref),
             "memorisation": memorisation(train, held, held)}
    return {"data": data, "n": n, "n_heldout": int(held.shape[0]), **block(samples), "floor": floor,
            "heldout_classifier": classifier_report(clf, held, held_labels)}


# ------------------------------------------------------------------------------------------------
# Inception FID from local files
# ------------------------------------------------------------------------------------------------
def _inception(weights_path: str) -> nn.Module:
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weight file {weights_path!r} not found (torch-fidelity's "
                                "pt_inception-2015-12-05-6726825d.pth; it is not downloaded)")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as exc:
        raise ImportError(f"Inception FID uses torchmetrics and torch-fidelity: {METRICS_EXTRA_HINT} torch-fidelity") from exc
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path)


@torch.no_grad()
def inception_features(images: torch.Tensor, weights_path: str, batch: int = 50) -> torch.Tensor:
    """(N, 2048) float64 pool features of uint8 images (N, C, H, W), C in {1, 3} (grey is repeated)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    net = _inception(weights_path)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return torch.cat([net(chunk.contiguous()).double() for chunk in _batches(images, batch)])


def feature_stats(features: torch.Tensor):
    """(mu (F,), sigma (F, F)) float64 numpy: mean and unbiased covariance of ``features`` (N, F), N >= 2."""
    f = features.double()
    if f.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 images, got {f.shape[0]}")
    return f.mean(0).numpy(), torch.cov(f.T).reshape(f.shape[1], f.shape[1]).numpy()


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2) with torchmetrics' FID formula.

    The statistics are loaded into the metric's accumulators (as 2 pseudo-samples' sums, which
    reproduce the given mean and covariance exactly), so the library does the matrix square root.
    """
    mu1, mu2 = torch.as_tensor(np.asarray(mu1), dtype=torch.float64), torch.as_tensor(np.asarray(mu2), dtype=torch.float64)
    s1, s2 = torch.as_tensor(np.asarray(sigma1), dtype=torch.float64), torch.as_tensor(np.asarray(sigma2), dtype=torch.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"statistics must be mu (F,) and sigma (F, F) of one F; got {tuple(mu1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")

    class _Dim(nn.Module):
        num_features = d

    fid = _fid_metric(_Dim())
    n = 2
    for (mu, s), real in (((mu1, s1), True), ((mu2, s2), False)):
        pre = "real" if real else "fake"
        setattr(fid, f"{pre}_features_sum", mu * n)
        setattr(fid, f"{pre}_features_cov_sum", s * (n - 1) + n * torch.outer(mu, mu))
        setattr(fid, f"{pre}_features_num_samples", torch.tensor(n))
    fid.orig_dtype = torch.float64
    with warnings.catch_warnings():  # the accumulators were set directly, not by update()
        warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
        return float(fid.compute())
