"""Launch counts and host synchronisations of the public ops: the numbers docs/kernels.md states.

A launch is a dispatched op that runs a kernel: every op a ``TorchDispatchMode`` sees, except views
and allocations (``empty``). A host synchronisation is an op that copies a device value to the
host (``aten::_local_scalar_dense`` behind ``.item()`` and ``bool(tensor)``, and the ops whose
output shape depends on values, such as ``nonzero``). Measured with the default settings (value
checks on) on the cpu backend and under the Triton interpreter, CIFAR-10 shape with t a (B,) tensor
on the data's device; the CUDA backend issues the same ops (its forward loss may add one finalize
kernel for long rows), and a GPU run checks it (bench/gpu_check.sh).
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cld_fast as cf
from cld_fast.samplers.gddim import gddim_table
from cld_fast.sde import CLD

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty"}
SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique", "_unique2",
         "unique_consecutive", "equal", "allclose", "repeat_interleave", "tolist"}


class _Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs.append(str(func))
        if not func.is_view and name not in ALLOCATIONS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def launches(fn):
    with _Launches() as mode:
        fn()
    return mode.ops


def launches_and_syncs(fn):
    with _Launches() as mode:
        fn()
    return mode.ops, mode.syncs


def test_sync_counter_sees_host_reads():
    """The counter is not blind: .item(), bool(tensor) and nonzero are syncs."""
    t = torch.rand(4)
    for read in (lambda: t.sum().item(), lambda: bool((t > 2).any()), lambda: t.nonzero()):
        assert launches_and_syncs(read)[1], read


def _backend(name):
    if name not in cf.backends():
        pytest.skip(f"{name} backend not available")
    return name


# (public call, launches at most). perturb: the kernel + the Philox seed draw from the generator (a
# passed seed makes it one launch); loss forward: one kernel (triton: + the final sum over a long row's chunks).
GOALS = {"perturb": 2, "hsm_loss": 2, "hsm_loss_backward": 1, "sscs_step": 1, "em_step": 1, "gddim_step": 1,
         "sscs_step_inpaint": 1, "em_step_inpaint": 1, "denoise_inpaint": 1, "gddim_step_inpaint": 1,
         "half_step_inpaint": 1, "sscs_step_guided": 1, "em_step_guided": 1, "denoise_guided": 1,
         "gddim_step_guided": 1}


def _calls(backend, b):
    """name -> zero-argument public call, with default settings, at CIFAR-10 shape."""
    sde = CLD()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 3, 32, 32, generator=g)
    t = torch.rand(b, generator=g) * 0.99 + 0.01
    out = torch.randn(b, 3, 32, 32, generator=g, requires_grad=True)
    ts = torch.linspace(1.0, 0.01, 11, dtype=torch.float64)
    step = torch.zeros(1, dtype=torch.int64)
    seed = torch.tensor([7], dtype=torch.int64)
    u, noise = cf.perturb(x0, t, sde, backend=backend)  # warm-up: the parameter tensor is cached
    loss = cf.hsm_loss(out, u, t, sde, noise, backend=backend)
    y = torch.randn(b, 3, 32, 32, generator=g)
    w = u.clone()
    table = gddim_table(sde, ts, order=2).to(torch.float64)
    hist = cf.gddim_history(u, 2)
    one = torch.ones(())
    obs = cf.Inpaint(x0, torch.rand(1, 3, 32, 32, generator=g) < 0.5).packed(x0.shape, torch.float32, "cpu")
    doubled = torch.randn(2 * b, 3, 32, 32, generator=g)  # a batch-doubled network output: its halves
    cond, uncond = doubled[:b], doubled[b:]
    guide = dict(y_uncond=uncond, guide_weight=2.0)
    return {
        "perturb": lambda: cf.perturb(x0, t, sde, backend=backend),
        "perturb_seeded": lambda: cf.perturb(x0, t, sde, seed=seed, backend=backend),
        "hsm_loss": lambda: cf.hsm_loss(out, u, t, sde, noise, backend=backend),
        "hsm_loss_backward": lambda: torch.autograd.grad(loss, out, one, retain_graph=True),
        "sscs_step": lambda: cf.sscs_step_(w, y, ts, sde, step=step, mixed=True, seed=seed, backend=backend),
        "em_step": lambda: cf.em_step_(w, y, ts, sde, step=step, mixed=True, seed=seed, backend=backend),
        "gddim_step": lambda: cf.gddim_step_(w, y, hist, table, step=step, backend=backend),
        "sscs_step_inpaint": lambda: cf.sscs_step_(w, y, ts, sde, step=step, mixed=True, seed=seed, backend=backend,
                                                   obs=obs),
        "em_step_inpaint": lambda: cf.em_step_(w, y, ts, sde, step=step, mixed=True, seed=seed, backend=backend,
                                               obs=obs),
        "denoise_inpaint": lambda: cf.em_step_(w, y, ts, sde, step=step, mixed=True, denoise=True, backend=backend,
                                               obs=obs),
        "gddim_step_inpaint": lambda: cf.gddim_step_(w, y, hist, table, step=step, backend=backend, obs=obs, ts=ts,
                                                     sde=sde, seed=seed),
        "half_step_inpaint": lambda: cf.half_step_(w, ts, sde, step=step, seed=seed, backend=backend, obs=obs),
        "sscs_step_guided": lambda: cf.sscs_step_(w, cond, ts, sde, step=step, mixed=True, seed=seed, backend=backend,
                                                  **guide),
        "em_step_guided": lambda: cf.em_step_(w, cond, ts, sde, step=step, mixed=True, seed=seed, backend=backend,
                                              **guide),
        "denoise_guided": lambda: cf.em_step_(w, cond, ts, sde, step=step, mixed=True, denoise=True, backend=backend,
                                              **guide),
        "gddim_step_guided": lambda: cf.gddim_step_(w, cond, hist, table, step=step, backend=backend, **guide),
    }


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_public_ops_launch_counts_and_no_host_sync(backend):
    """The README counts hold with value checks on (the default), and nothing syncs the host."""
    backend = _backend(backend)
    assert cf.checks.value_checks_enabled()
    b = 8 if backend == "triton" else 128  # the interpreter is slow; the count does not depend on B
    counts = {}
    for name, call in _calls(backend, b).items():
        ops, syncs = launches_and_syncs(call)
        assert not syncs, f"{name}: host synchronisations {syncs}"
        counts[name] = ops
    assert len(counts["perturb_seeded"]) == 1, counts["perturb_seeded"]
    for name, goal in GOALS.items():
        assert len(counts[name]) <= goal, f"{name}: {len(counts[name])} launches {counts[name]} (goal {goal})"
    if backend == "cpu":
        assert len(counts["hsm_loss"]) == 1, counts["hsm_loss"]


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_inpainting_keeps_one_launch_per_network_evaluation(method):
    """A sampler run with cf.Inpaint launches as many kernels per step as without (one), no host sync in the
    loop; em and gddim add the start state's replacement (perturb + one select) once per run."""
    _backend("cpu")
    sde = CLD()
    g = torch.Generator().manual_seed(0)
    x_obs = torch.randn(4, 3, 8, 8, generator=g)
    cond = cf.Inpaint(x_obs, torch.rand(1, 3, 8, 8, generator=g) < 0.5)

    def net(u, t):
        return -u[:, 3:]

    def run(steps, condition):
        with _Launches() as mode:
            cf.sample(net, x_obs.shape, sde, steps=steps, method=method, generator=torch.Generator().manual_seed(1),
                      condition=condition)
        return len(mode.ops), len(mode.syncs)

    (p5, s5), (p9, s9) = run(5, None), run(9, None)
    (c5, t5), (c9, t9) = run(5, cond), run(9, cond)
    assert c9 - c5 == p9 - p5, (c9 - c5, p9 - p5)  # the same launches per extra step
    assert (t5, t9) == (s5, s9)  # no host synchronisation added
    extra = 0 if method == "sscs" else 6  # the start: its time, perturb, mask, cat, select, copy into u
    assert c5 - p5 <= extra + 4, (c5, p5)  # + packing the condition once (cast, select, zeros, stack)


class _LaunchesBesidesNetwork(_Launches):
    """_Launches that leaves out what runs inside the network (``inside`` > 0)."""

    def __init__(self):
        super().__init__()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _CountedCondNet(torch.nn.Module):
    """A class-conditional mixed-score "network" whose own ops the counting mode leaves out."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.mode = None

    def forward(self, u, t, class_labels=None):
        self.mode.inside += 1
        try:
            labels = torch.zeros(u.shape[0]) if class_labels is None else class_labels.to(u.dtype)
            return -0.5 * u[:, 2:] + 0.1 * labels[:, None]
        finally:
            self.mode.inside -= 1


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_classifier_free_guidance_is_fused_into_the_step(method):
    """A classifier-free guided run launches, per step and besides the network, the launches of the unguided
    run plus the batch doubling of the network's input (two cats: u and t) and nothing else: the
    combination of the two halves happens inside the one fused step op per NFE, and no host sync."""
    _backend("cpu")
    sde = CLD()
    net = _CountedCondNet()
    score = cf.score_fn(net, sde)

    def run(steps, guidance):
        with _LaunchesBesidesNetwork() as mode:
            net.mode = mode
            res = cf.sample(score, (4, 2), sde, steps=steps, method=method, guidance=guidance,
                            generator=torch.Generator().manual_seed(1))
        assert res.nfe == steps
        return Counter(mode.ops), len(mode.syncs)

    guide = cf.ClassifierFree([0, 1, 2, 1], 2.0)
    (p5, s5), (p9, s9) = run(5, None), run(9, None)
    (g5, t5), (g9, t9) = run(5, guide), run(9, guide)
    per_step_plain, per_step_guided = p9 - p5, g9 - g5
    assert per_step_guided - per_step_plain == Counter({"aten.cat.default": 2 * 4}), (per_step_guided, per_step_plain)
    assert per_step_plain - per_step_guided == Counter()
    fused = sum(n for op, n in g9.items() if op.startswith("cld_fast."))
    assert fused == 9 + (1 if method == "sscs" else 0), g9  # one step op per NFE (sscs: + its opening half step)
    assert (t5, t9) == (s5, s9)


BAD_VALUES = [
    # (name, call with one bad value, the argument the error must name)
    ("t nan", lambda b, c: cf.perturb(c["x0"], c["t_nan"], c["sde"], backend=b), "t contains NaN"),
    ("t > 1", lambda b, c: cf.perturb(c["x0"], c["t"] + 1, c["sde"], backend=b), "t must lie in (0, 1]"),
    ("x0 inf", lambda b, c: cf.perturb(c["x0_inf"], c["t"], c["sde"], backend=b), "x0 contains NaN or inf"),
    ("seed", lambda b, c: cf.perturb(c["x0"], c["t"], c["sde"], seed=c["bad_seed"], backend=b), "seed must be in"),
    ("loss t", lambda b, c: cf.hsm_loss(c["out"], c["u"], c["t_nan"], c["sde"], c["noise"], backend=b), "t contains NaN"),
    ("step", lambda b, c: cf.sscs_step_(c["u"].clone(), c["out"], c["ts"], c["sde"], step=c["bad_step"], seed=1,
                                        backend=b), "step = 10 is out of range"),
    ("em step", lambda b, c: cf.em_step_(c["u"].clone(), c["out"], c["ts"], c["sde"], step=c["bad_step"], seed=1,
                                         backend=b), "step = 10 is out of range"),
    ("ts", lambda b, c: cf.sscs_step_(c["u"].clone(), c["out"], c["ts"] * 2, c["sde"], step=0, backend=b),
     "ts must lie in [0, 1]"),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_value_still_raises_naming_the_argument(backend, case):
    backend = _backend(backend)
    _, call, message = case
    sde = CLD()
    x0 = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0.5, 0.25])
    u, noise = cf.perturb(x0, t, sde, backend=backend)
    x0_inf = x0.clone()
    x0_inf[1, 2, 3, 3] = float("inf")
    c = dict(sde=sde, x0=x0, t=t, t_nan=torch.tensor([0.5, float("nan")]), x0_inf=x0_inf, u=u, noise=noise,
             out=torch.randn(2, 3, 4, 4), ts=torch.linspace(1.0, 0.01, 11, dtype=torch.float64),
             bad_seed=torch.tensor([-3], dtype=torch.int64), bad_step=torch.tensor([10], dtype=torch.int64))
    with pytest.raises(ValueError) as info:
        call(backend, c)
    assert message in str(info.value)


def test_training_step_without_tables_is_four_launches():
    """perturb + loss forward + loss backward in at most 4 launches besides the network (cpu backend)."""
    backend = _backend("cpu")
    sde = CLD()
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Conv2d(6, 3, 3, padding=1)
    x0 = torch.randn(16, 3, 8, 8, generator=g)
    t = torch.rand(16, generator=g) * 0.99 + 0.01
    seed = torch.tensor([3], dtype=torch.int64)
    cf.perturb(x0, t, sde, seed=seed, backend=backend)
    with _Launches() as mode:
        u, noise = cf.perturb(x0, t, sde, seed=seed, backend=backend)
        n_perturb = len(mode.ops)
    out = net(u).detach().requires_grad_(True)
    with _Launches() as mode:
        loss = cf.hsm_loss(out, u, t, sde, noise, backend=backend)
        torch.autograd.grad(loss, out, torch.ones(()))
    assert n_perturb + len(mode.ops) <= 4, mode.ops
    assert not mode.syncs, mode.syncs
