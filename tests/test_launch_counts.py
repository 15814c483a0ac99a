"""Launch counts of the public ops: the numbers docs/kernels.md states.

A launch is a dispatched op that runs a kernel: every op a ``TorchDispatchMode`` sees, except views
and allocations (``empty``). Measured with value checks off (their host reads are the only extra
ops) on the cpu backend and under the Triton interpreter, CIFAR-10 shape with t a (B,) tensor on
the data's device; the CUDA backend issues the same ops (its forward loss may add one finalize
kernel for long rows), and a GPU run checks it (bench/gpu_check.sh).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cld_fast as cf
from cld_fast.sde import CLD

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty"}


class _Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in ALLOCATIONS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def launches(fn):
    with _Launches() as mode:
        fn()
    return mode.ops


def _backend(name):
    if name not in cf.backends():
        pytest.skip(f"{name} backend not available")
    return name


# (public call, launches at most). perturb: the kernel + the Philox seed draw from the generator (a
# passed seed makes it one launch); loss forward: one kernel (triton: + the final sum over a long row's chunks).
GOALS = {"perturb": 2, "hsm_loss": 2, "hsm_loss_backward": 1, "sscs_step": 1}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_public_ops_launch_counts(backend):
    backend = _backend(backend)
    sde = CLD()
    g = torch.Generator().manual_seed(0)
    b = 8 if backend == "triton" else 128  # the interpreter is slow; the count does not depend on B
    x0 = torch.randn(b, 3, 32, 32, generator=g)
    t = torch.rand(b, generator=g) * 0.99 + 0.01
    out = torch.randn(b, 3, 32, 32, generator=g, requires_grad=True)
    ts = torch.linspace(1.0, 0.01, 11, dtype=torch.float64)
    step = torch.zeros(1, dtype=torch.int64)
    seed = torch.tensor([7], dtype=torch.int64)
    with cf.value_checks(False):
        u, noise = cf.perturb(x0, t, sde, backend=backend)  # warm-up: the parameter tensor is cached
        counts = {
            "perturb": launches(lambda: cf.perturb(x0, t, sde, backend=backend)),
            "perturb_seeded": launches(lambda: cf.perturb(x0, t, sde, seed=seed, backend=backend)),
            "hsm_loss": launches(lambda: cf.hsm_loss(out, u, t, sde, noise, backend=backend)),
        }
        loss = cf.hsm_loss(out, u, t, sde, noise, backend=backend)
        grad = torch.ones(())
        counts["hsm_loss_backward"] = launches(lambda: torch.autograd.grad(loss, out, grad))
        y = torch.randn(b, 3, 32, 32, generator=g)
        w = u.clone()
        counts["sscs_step"] = launches(lambda: cf.sscs_step_(w, y, ts, sde, step=step, mixed=True, seed=seed,
                                                             backend=backend))
    assert len(counts["perturb_seeded"]) == 1, counts["perturb_seeded"]
    for name, goal in GOALS.items():
        assert len(counts[name]) <= goal, f"{name}: {len(counts[name])} launches {counts[name]} (goal {goal})"
    if backend == "cpu":
        assert len(counts["hsm_loss"]) == 1, counts["hsm_loss"]


def test_training_step_without_tables_is_four_launches():
    """perturb + loss forward + loss backward in at most 4 launches besides the network (cpu backend)."""
    backend = _backend("cpu")
    sde = CLD()
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Conv2d(6, 3, 3, padding=1)
    x0 = torch.randn(16, 3, 8, 8, generator=g)
    t = torch.rand(16, generator=g) * 0.99 + 0.01
    seed = torch.tensor([3], dtype=torch.int64)
    with cf.value_checks(False):
        cf.perturb(x0, t, sde, seed=seed, backend=backend)
        with _Launches() as mode:
            u, noise = cf.perturb(x0, t, sde, seed=seed, backend=backend)
            n_perturb = len(mode.ops)
        out = net(u).detach().requires_grad_(True)
        with _Launches() as mode:
            loss = cf.hsm_loss(out, u, t, sde, noise, backend=backend)
            torch.autograd.grad(loss, out, torch.ones(()))
    assert n_perturb + len(mode.ops) <= 4, mode.ops
