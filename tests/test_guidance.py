"""Class-conditional sampling (cld_fast.guidance): the guided score against float64 references, the
mixed-score fold, the classifier-free combination fused vs unfused, exactness on toy mixtures, bad
inputs and reproducibility."""
import pytest
import torch

import cld_fast as cf
from cld_fast.samplers.core import Evaluator
from cld_fast.toy import GaussianMixture2D, energy_distance

pytestmark = pytest.mark.usefixtures("one_thread")

MIXTURES = [
    (GaussianMixture2D(), cf.CLD()),
    (GaussianMixture2D(3, 1.0, 0.3), cf.CLD(beta0=1.0, beta1=7.0, m_inv=9.0)),
]
IDS = ["8gauss-default", "3gauss-beta1-7-minv-9"]


def _state(b=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, generator=g, dtype=torch.float64) * (1.0 - 1e-3) + 1e-3
    return torch.randn(b, 4, generator=g, dtype=torch.float64), t


def _component_scores(gm, sde, u, t):
    """Float64 closed form: responsibilities w (B, K) and component v-scores (B, K, 2) of the perturbed mixture."""
    logw, comp = gm._cld_terms(u, t, sde)
    return torch.softmax(logw, 1), comp


class CondNet(torch.nn.Module):
    """A tiny class-conditional model(u, t, class_labels) for 2-D data (label K = "no label")."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5 + 4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
        self.calls = []

    def forward(self, u, t, class_labels=None):
        if class_labels is None:
            class_labels = torch.full((u.shape[0],), self.num_classes, dtype=torch.long)
        self.calls.append(u.shape[0])
        onehot = torch.nn.functional.one_hot(class_labels, self.num_classes + 1).to(u.dtype)
        return self.net(torch.cat([u, t[:, None].to(u.dtype), onehot], 1))


# ---- the guided score ---------------------------------------------------------------------------
@pytest.mark.parametrize("gm,sde", MIXTURES, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_classifier_guided_score_matches_bayes_in_float64(gm, sde, scale):
    """Exact classifier: score + s grad_v log p_t(k | u) = s_mix + s (s_k - sum_j w_j s_j) (closed form)."""
    u, t = _state()
    labels = torch.arange(u.shape[0]) % gm.n_components
    guide = cf.ClassifierGuidance(gm.cld_classifier(sde), labels, scale).bind(None, u.shape[0], "cpu")
    ev = Evaluator(gm.cld_score(sde), sde, (u.shape[0], 2), guidance=guide)
    got = ev(u, t)
    w, comp = _component_scores(gm, sde, u, t)
    mix = (w[:, :, None] * comp).sum(1)
    own = comp[torch.arange(u.shape[0]), labels]
    want = mix + scale * (own - mix)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if scale == 1.0:  # the conditional score is the component's
        torch.testing.assert_close(got.double(), own, rtol=1e-5, atol=1e-5 * own.abs().max().item())


def test_classifier_gradient_is_taken_with_respect_to_v():
    """The term is grad_v, not grad_x: against central differences of log p_t(k | u) in v."""
    gm, sde = MIXTURES[0]
    u, t = _state(8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    clf = gm.cld_classifier(sde)
    got = cf.guidance.classifier_gradient(clf, labels, u, t, sde)
    h = 1e-6
    for d in range(2):
        e = torch.zeros_like(u)
        e[:, 2 + d] = h
        lp = lambda uu: clf(uu, t).gather(1, labels[:, None])[:, 0]  # noqa: E731
        fd = (lp(u + e) - lp(u - e)) / (2 * h)
        torch.testing.assert_close(got[:, d], fd, rtol=1e-5, atol=1e-6)


def test_classifier_term_with_the_mixed_score_fold(sde, toy_score_net):
    """Folded network output: c0 v + c1 (out - l22 g) equals the unfolded score + g (float64 reference),
    and cf.sample gives the same samples folded and unfolded."""
    gm = GaussianMixture2D()
    wrapped = cf.score_fn(toy_score_net(width=32)(), sde)
    u, t = _state(32)
    labels = torch.full((32,), 2)
    guide = cf.ClassifierGuidance(gm.cld_classifier(sde), labels, 1.5).bind(None, 32, "cpu")
    folded = Evaluator(wrapped, sde, (32, 2), guidance=guide)
    assert folded.fold
    raw = folded(u.float(), t.float()).double()
    coef = sde.score_coefficients(t)  # float64 (B, 2): score = c0 v + c1 out
    got = coef[:, :1] * u[:, 2:] + coef[:, 1:] * raw
    ref_out = wrapped.model.double()(u, t)
    wrapped.model.float()
    g = cf.guidance.classifier_gradient(gm.cld_classifier(sde), labels, u, t, sde)
    want = coef[:, :1] * u[:, 2:] + coef[:, 1:] * ref_out + 1.5 * g
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    plain = Evaluator(lambda uu, tt: wrapped(uu, tt), sde, (32, 2), guidance=guide)
    assert not plain.fold
    torch.testing.assert_close(plain(u.float(), t.float()).double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    kw = dict(steps=12, guidance=cf.ClassifierGuidance(gm.cld_classifier(sde), 2, 1.5))
    a = cf.sample(wrapped, (128, 2), sde, generator=torch.Generator().manual_seed(1), **kw)
    b = cf.sample(lambda uu, tt: wrapped(uu, tt), (128, 2), sde, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(a.u, b.u, rtol=1e-4, atol=1e-4)


# ---- classifier-free guidance -------------------------------------------------------------------
def test_combine_convention():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(Evaluator.combine(a, b, 0.0), a)
    torch.testing.assert_close(Evaluator.combine(a, b, 2.0), 3 * a - 2 * b)


@pytest.mark.parametrize("weight", [0.0, 0.7, 3.0])
def test_classifier_free_fused_matches_unfused_float64(sde, weight):
    """Combining raw mixed-score outputs (the fold) = combining scores: against (1 + w) s(y) - w s(none) in float64."""
    net = CondNet()
    wrapped = cf.score_fn(net, sde)
    assert wrapped.num_classes == 3
    u, t = _state(16)
    labels = torch.arange(16) % 3
    guide = cf.ClassifierFree(labels, weight).bind(wrapped, 16, "cpu")
    ev = Evaluator(wrapped, sde, (16, 2), guidance=guide)
    assert ev.fold
    net.calls.clear()
    raw = ev(u.float(), t.float()).double()
    assert net.calls == ([16] if weight == 0 else [32])  # one (batch-doubled) network call
    coef = sde.score_coefficients(t)
    got = coef[:, :1] * u[:, 2:] + coef[:, 1:] * raw
    net64 = CondNet().double()
    score = lambda y: coef[:, :1] * u[:, 2:] + coef[:, 1:] * net64(u, t, y)  # noqa: E731
    want = (1 + weight) * score(labels) - weight * score(torch.full_like(labels, 3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_classifier_free_samples_folded_and_unfolded_agree(sde):
    wrapped = cf.score_fn(CondNet(), sde)

    class Plain:
        num_classes = 3

        def __call__(self, u, t, class_labels=None):
            return wrapped(u, t, class_labels)

    kw = dict(steps=10, guidance=cf.ClassifierFree(torch.arange(64) % 3, 1.5))
    for method in ("sscs", "em", "gddim"):
        a = cf.sample(wrapped, (64, 2), sde, method=method, generator=torch.Generator().manual_seed(4), **kw)
        b = cf.sample(Plain(), (64, 2), sde, method=method, generator=torch.Generator().manual_seed(4), **kw)
        assert a.nfe == b.nfe == 10
        torch.testing.assert_close(a.u, b.u, rtol=1e-4, atol=1e-4, msg=method)


@pytest.mark.parametrize("gm,sde", MIXTURES, ids=IDS)
def test_classifier_free_weight_w_is_classifier_guidance_scale_1_plus_w(gm, sde):
    """With exact scores, (1 + w) s_k - w s_mix = s_mix + (1 + w) grad_v log p_t(k | u): same samples."""
    for w in (0.0, 2.0):
        a = cf.sample(gm.cld_class_score(sde), (256, 2), sde, steps=20, generator=torch.Generator().manual_seed(7),
                      guidance=cf.ClassifierFree(1, w))
        b = cf.sample(gm.cld_score(sde), (256, 2), sde, steps=20, generator=torch.Generator().manual_seed(7),
                      guidance=cf.ClassifierGuidance(gm.cld_classifier(sde), 1, 1.0 + w))
        torch.testing.assert_close(a.u, b.u, rtol=1e-4, atol=1e-4)


# ---- exactness on the toy -----------------------------------------------------------------------
# Bars from bench/results/guidance-toy-cpu.md (4000 samples of class 1, SSCS, seeds 0 and 1): at
# 100 NFE the energy distance to the class is 8.1e-5 (max 1.4e-4) for the 8-Gaussian mixture and
# 1.4e-4 (max 3.3e-4) for the 3-Gaussian one with CLD(1, 7, 9); the noise floor is ~1e-5 and the
# unguided sampler sits at 0.38 / 0.41, scale 4 at ~0.01 / 0.03. Bar: 2x the larger seed maximum,
# so a sampler bias of a few times the measured error fails (a guidance term off by -30% or +40% gives
# 9.6e-4 / 3.4e-3 and 7.6e-4 / 4.6e-3, measured), and the floor check shows the floor is far below.
TOY_BAR = {"8gauss-default": 3e-4, "3gauss-beta1-7-minv-9": 7e-4}


@pytest.mark.parametrize("case", range(2), ids=IDS)
def test_exact_classifier_guidance_samples_the_class(case):
    gm, sde = MIXTURES[case]
    n = 4000
    ref = gm.sample_class(n, 1, torch.Generator().manual_seed(1000))
    floor = abs(energy_distance(gm.sample_class(n, 1, torch.Generator().manual_seed(2000)), ref))
    guided = cf.sample(gm.cld_score(sde), (n, 2), sde, steps=100, generator=torch.Generator().manual_seed(0),
                       guidance=cf.ClassifierGuidance(gm.cld_classifier(sde), 1, 1.0))
    ed = energy_distance(guided.x, ref)
    print(IDS[case], "guided ED", ed, "floor", floor)
    assert ed < TOY_BAR[IDS[case]], ed
    assert floor < TOY_BAR[IDS[case]] / 3
    unguided = cf.sample(gm.cld_score(sde), (n, 2), sde, steps=20, generator=torch.Generator().manual_seed(0))
    assert energy_distance(unguided.x, ref) > 100 * TOY_BAR[IDS[case]]


# ---- arguments and reproducibility --------------------------------------------------------------
def test_bad_guidance_arguments(sde, gm):
    score, clf = gm.cld_score(sde), gm.cld_classifier(sde)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        cf.ClassifierGuidance(clf, 1, -1.0)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        cf.ClassifierFree(1, float("nan"))
    with pytest.raises(TypeError, match="labels must be an int or a 1-D integer tensor"):
        cf.ClassifierFree(torch.tensor([0.5]), 1.0)
    with pytest.raises(TypeError, match="classifier must be callable"):
        cf.ClassifierGuidance("net.pt", 1)
    with pytest.raises(ValueError, match=r"labels must hold one label per sample \(8\)"):
        cf.sample(score, (8, 2), sde, steps=3, guidance=cf.ClassifierGuidance(clf, [0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 8\)"):
        cf.sample(gm.cld_class_score(sde), (4, 2), sde, steps=3, guidance=cf.ClassifierFree([0, 1, 8, 2], 1.0))
    with pytest.raises(ValueError, match="labels must lie in >= 0"):
        cf.sample(score, (2, 2), sde, steps=3, guidance=cf.ClassifierGuidance(clf, [-1, 0]))
    with pytest.raises(ValueError, match="needs a class-conditional score function"):
        cf.sample(score, (4, 2), sde, steps=3, guidance=cf.ClassifierFree(1, 1.0))
    with pytest.raises(TypeError, match="guidance must be cf.ClassifierGuidance"):
        cf.sample(score, (4, 2), sde, steps=3, guidance=3)
    with pytest.raises(ValueError, match=r"must return logits of shape \(B, K\)"):
        cf.sample(score, (4, 2), sde, steps=3, guidance=cf.ClassifierGuidance(lambda u, t: u.sum(1), 1))


@pytest.mark.parametrize("kind", ["classifier", "free"])
def test_same_seed_same_guided_samples(sde, gm, kind):
    if kind == "classifier":
        score, guide = gm.cld_score(sde), cf.ClassifierGuidance(gm.cld_classifier(sde), [1, 2] * 32, 2.0)
    else:
        score, guide = gm.cld_class_score(sde), cf.ClassifierFree([1, 2] * 32, 2.0)
    runs = [cf.sample(score, (64, 2), sde, steps=8, generator=torch.Generator().manual_seed(s), guidance=guide)
            for s in (5, 5, 6)]
    assert torch.equal(runs[0].u, runs[1].u)
    assert not torch.equal(runs[0].u, runs[2].u)


def _dispatch_counts(fn):
    from test_launch_counts import launches_and_syncs

    ops, syncs = launches_and_syncs(fn)
    return [o for o in ops if o.startswith("cld_fast")], syncs


@pytest.mark.parametrize("kind", ["classifier", "free"])
def test_guidance_keeps_one_fused_step_per_evaluation_and_no_host_sync(sde, gm, toy_score_net, kind):
    """The fused step ops of a guided run are those of the unguided run (one per NFE), and the loop reads
    nothing back to the host (the one sync of cf.sample is its final finite check)."""
    if kind == "classifier":
        score = cf.score_fn(toy_score_net(width=16)(), sde)
        guide = cf.ClassifierGuidance(gm.cld_classifier(sde), 1, 2.0)
    else:
        score, guide = cf.score_fn(CondNet(), sde), cf.ClassifierFree(1, 2.0)
    run = lambda g: cf.sample(score, (32, 2), sde, steps=6, guidance=g,  # noqa: E731
                              generator=torch.Generator().manual_seed(0))
    plain_ops, plain_syncs = _dispatch_counts(lambda: run(None))
    guided_ops, guided_syncs = _dispatch_counts(lambda: run(guide))
    assert guided_ops == plain_ops and len(plain_ops) >= 6
    assert len(guided_syncs) == len(plain_syncs), guided_syncs
