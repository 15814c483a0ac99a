"""pytest-benchmark wrappers of the CPU kernels: ``pytest bench/ --benchmark-only``.

Backends ``cpu`` (C++/OpenMP, skipped when the extension is not built) and ``torch`` (reference),
ops perturb / HSM loss forward+backward / fused SSCS step / EM step at one small size, each through
the public op with value checks off (as the trainer and samplers call them). Speed is shown, never
asserted. Skipped entirely without pytest-benchmark.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

import cld_fast as cf  # noqa: E402
from cld_fast import backends  # noqa: E402

SHAPE = (32, 3, 32, 32)   # CIFAR-10 batch 32 (98,304 elements of x)
STEPS = 50


def _backend(name):
    mod = backends.get(name)
    if not mod.is_available() or not mod.supports(torch.device("cpu"), torch.float32):
        pytest.skip(f"backend {name!r} unavailable: {mod.why_unavailable()}")
    return name


@pytest.fixture(params=["cpu", "torch"])
def backend(request):
    return _backend(request.param)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    sde = cf.CLD()
    x0 = torch.randn(SHAPE, generator=g)
    t = torch.rand(SHAPE[0], generator=g) * (1 - 1e-5) + 1e-5
    ts = 1.0 - torch.linspace(0.0, 1.0 - 1e-3, STEPS + 1, dtype=torch.float64)   # the samplers' linear grid
    return dict(g=g, sde=sde, x0=x0, t=t, ts=ts, y=torch.randn(SHAPE, generator=g),
                u=sde.prior_sampling(SHAPE, generator=g))


@pytest.fixture(autouse=True)
def _no_value_checks():
    with cf.value_checks(False):
        yield


def test_perturb(benchmark, backend, data):
    benchmark.group = "perturb"
    benchmark(cf.perturb, data["x0"], data["t"], data["sde"], generator=data["g"], backend=backend)


def test_hsm_loss_fwd_bwd(benchmark, backend, data):
    benchmark.group = "hsm_loss fwd+bwd"
    sde, t = data["sde"], data["t"]
    u, noise = cf.perturb(data["x0"], t, sde, generator=data["g"], backend=backend)
    out = torch.randn(SHAPE).requires_grad_(True)

    def fwd_bwd():
        return torch.autograd.grad(cf.hsm_loss(out, u, t, sde, noise, backend=backend), out)

    benchmark(fwd_bwd)


def test_sscs_step(benchmark, backend, data):
    benchmark.group = "sscs_step_"
    step = torch.tensor([STEPS // 2])
    seed = torch.tensor([1234])
    u, y = data["u"].clone(), data["y"]
    benchmark(cf.sscs_step_, u, y, data["ts"], data["sde"], step=step, mixed=True, seed=seed, backend=backend)


def test_em_step(benchmark, backend, data):
    benchmark.group = "em_step_"
    step = torch.tensor([STEPS // 2])
    seed = torch.tensor([1234])
    u, y = data["u"].clone(), data["y"]
    benchmark(cf.em_step_, u, y, data["ts"], data["sde"], step=step, mixed=True, seed=seed, backend=backend)
