"""The op contract: every public op x backend x dtype x layout against the torch reference.

The torch backend runs the ``reference`` functions of ``cld_fast.opdefs`` (float64 coefficients from
``cld_fast.sde``) on contiguous copies of the inputs; every available backend (the torch backend itself
included, on the strided inputs) must agree with it for the same inputs and noise:
float32 states to 1e-5, float64 to 1e-12 (explicit noise), and in seed mode (in-kernel Philox) to
float32 rounding of log/cos/sin. Layouts: contiguous, channels_last, sliced (strided), expanded
(stride 0; not for in-place targets), transposed 2-D data (B, D) with a column stride of B, odd D
and D = 1. Backend-specific behaviour (tiling, Philox
bits, compilation, capture) is tested in tests/test_ops_<backend>.py.
"""
import pytest
import torch

import cld_fast as cf
from cld_fast.sde import CLD
from cld_fast.samplers.gddim import gddim_table

SDE = CLD(beta0=3.0, beta1=5.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6)
LAYOUTS = ["contiguous", "channels_last", "sliced", "expanded", "transposed", "odd_d", "d1"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
SEED_TOL = dict(rtol=1e-5, atol=2e-5)


def _backends():
    return [b for b in ("cpu", "triton", "cuda") if b in cf.backends()]


def _device(backend):
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")


def _cases():
    for backend in ("torch", "cpu", "triton", "cuda"):
        for dtype in (torch.float32, torch.float64):
            for layout in LAYOUTS:
                yield pytest.param(backend, dtype, layout, id=f"{backend}-{str(dtype)[6:]}-{layout}")


def _skip_unless(backend, dtype):
    if backend not in cf.backends():
        pytest.skip(f"{backend} backend not available here")
    if not cf.backends.get(backend).supports(_device(backend), dtype):
        pytest.skip(f"{backend} does not take {dtype} states")


def _data(layout, b, channels, gen, dtype, device, inplace=False):
    """A (B, channels, ...) tensor of ``layout`` (values from ``gen``)."""
    if layout == "d1":  # 2-D data (B, 1); its state is (B, 2)
        return torch.randn(b, channels, generator=gen, dtype=dtype).to(device)
    if layout == "transposed":  # 2-D data (B, C) as the transpose of a (C, B) tensor: strides (1, B)
        return torch.randn(channels, b, generator=gen, dtype=dtype).to(device).t()
    shape = (b, channels, 5, 3) if layout == "odd_d" else (b, channels, 4, 4)
    if layout == "sliced":
        return torch.randn(shape[:3] + (2 * shape[3],), generator=gen, dtype=dtype).to(device)[..., ::2]
    if layout == "expanded" and not inplace:
        return torch.randn((1,) + shape[1:], generator=gen, dtype=dtype).to(device).expand(shape)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _channels(layout):
    return 1 if layout == "d1" else 3


def _times(b, gen, device, dtype=torch.float32):
    return (torch.rand(b, generator=gen, dtype=torch.float64) * 0.98 + 0.01).to(device, dtype)


def _c(x):
    """A contiguous copy: the reference side never sees the layout under test."""
    return x.contiguous().clone()


def _close(got, want, dtype, seeded=False):
    tol = SEED_TOL if seeded else TOL[dtype]  # in-kernel normals are float32 (log, cos, sin) everywhere
    torch.testing.assert_close(got.cpu(), want.cpu(), **tol)


@pytest.mark.parametrize("backend, dtype, layout", list(_cases()))
def test_perturb_and_loss(backend, dtype, layout):
    _skip_unless(backend, dtype)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(11)
    b, c = 5, _channels(layout)
    x0 = _data(layout, b, c, gen, dtype, dev)
    d = x0[0].numel()
    t = _times(b, gen, dev)
    eps = torch.randn(b, 2, d, generator=gen, dtype=dtype).to(dev)
    out = _data(layout, b, c, gen, dtype, dev)
    for objective in ("hsm", "dsm"):
        g1, g2 = torch.Generator(dev).manual_seed(3), torch.Generator(dev).manual_seed(3)
        u, noise = cf.perturb(x0, t, SDE, objective=objective, eps=eps, generator=g1, backend=backend)
        u_ref, noise_ref = cf.perturb(_c(x0), t, SDE, objective=objective, eps=eps, generator=g2, backend="torch")
        _close(u, u_ref, dtype)
    u, noise = cf.perturb(x0, t, SDE, eps=eps, backend=backend)
    u_ref, noise_ref = cf.perturb(_c(x0), t, SDE, eps=eps, backend="torch")
    for weighting in ("reweightedv2", "likelihood"):
        for reduction in ("none", "mean"):
            o1 = out.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
            o2 = _c(out.detach()).requires_grad_(True)
            loss = cf.hsm_loss(o1, u, t, SDE, noise, weighting=weighting, reduction=reduction, backend=backend)
            ref = cf.hsm_loss(o2, u_ref, t, SDE, noise_ref, weighting=weighting, reduction=reduction, backend="torch")
            _close(loss, ref, dtype)
            loss.sum().backward()
            ref.sum().backward()
            _close(o1.grad, o2.grad, dtype)
    _close(cf.mixed_score(out, u, t, SDE, backend=backend), cf.mixed_score(_c(out), _c(u_ref), t, SDE, backend="torch"),
           dtype)


@pytest.mark.parametrize("backend, dtype, layout", list(_cases()))
def test_perturb_and_loss_seed_mode(backend, dtype, layout):
    _skip_unless(backend, dtype)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(12)
    b, c = 4, _channels(layout)
    x0 = _data(layout, b, c, gen, dtype, dev)
    t = _times(b, gen, dev, torch.float64)
    seed = torch.tensor([987654321], dtype=torch.int64, device=dev)
    u, noise = cf.perturb(x0, t, SDE, seed=seed, backend=backend)
    u_ref, noise_ref = cf.perturb(_c(x0), t, SDE, seed=seed, backend="torch")
    _close(u, u_ref, dtype, seeded=True)
    out = _data(layout, b, c, gen, dtype, dev)
    o1 = out.detach().clone().requires_grad_(True)
    o2 = out.detach().clone().requires_grad_(True)
    loss = cf.hsm_loss(o1, u_ref, t, SDE, noise, reduction="none", backend=backend)
    ref = cf.hsm_loss(o2, u_ref, t, SDE, noise_ref, reduction="none", backend="torch")
    _close(loss, ref, dtype, seeded=True)
    loss.sum().backward()
    ref.sum().backward()
    _close(o1.grad, o2.grad, dtype, seeded=True)


def _step_inputs(layout, dtype, dev, gen):
    b, c = 3, _channels(layout)
    u = _data(layout, b, 2 * c, gen, dtype, dev, inplace=True)
    y = _data(layout, b, c, gen, dtype, dev)
    d = y[0].numel()
    return u, y, b, d


@pytest.mark.parametrize("backend, dtype, layout", list(_cases()))
def test_sampler_steps(backend, dtype, layout):
    _skip_unless(backend, dtype)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(13)
    ts = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.05], dtype=torch.float64, device=dev)
    u, y, b, d = _step_inputs(layout, dtype, dev, gen)
    eps2 = torch.randn(b, 2, d, generator=gen, dtype=dtype).to(dev)
    eps4 = torch.randn(b, 4, d, generator=gen, dtype=dtype).to(dev)
    eps1 = torch.randn(b, d, generator=gen, dtype=dtype).to(dev)

    def both(fn):
        a, r = u.clone(memory_format=torch.preserve_format), _c(u)
        fn(a, backend, y)
        fn(r, "torch", _c(y))
        _close(a, r, dtype)

    for step in (0, 2, 3):  # step 3 is the last step of the grid: no opening half step after it
        both(lambda w, be, yy: cf.half_step_(w, ts, SDE, step=step, eps=eps2, backend=be))
        for mixed in (False, True):
            both(lambda w, be, yy: cf.sscs_step_(w, yy, ts, SDE, step=step, mixed=mixed, eps=eps4, backend=be))
            both(lambda w, be, yy: cf.em_step_(w, yy, ts, SDE, step=step, mixed=mixed, eps=eps1, backend=be))
            both(lambda w, be, yy: cf.em_step_(w, yy, ts, SDE, step=step, mixed=mixed, denoise=True, backend=be))
            t = ts[step:step + 1]
            _close(cf.pf_drift(u, y, t, SDE, mixed=mixed, backend=backend),
                   cf.pf_drift(_c(u), _c(y), t, SDE, mixed=mixed, backend="torch"), dtype)
    step_t = torch.tensor([1], dtype=torch.int64, device=dev)
    seed = torch.tensor([5], dtype=torch.int64, device=dev)
    for fn in (lambda w, be, yy: cf.half_step_(w, ts, SDE, step=step_t, seed=seed, backend=be),
               lambda w, be, yy: cf.sscs_step_(w, yy, ts, SDE, step=step_t, seed=seed, backend=be),
               lambda w, be, yy: cf.em_step_(w, yy, ts, SDE, step=step_t, seed=seed, backend=be)):
        a, r = u.clone(memory_format=torch.preserve_format), _c(u)
        fn(a, backend, y)
        fn(r, "torch", _c(y))
        _close(a, r, dtype, seeded=True)


@pytest.mark.parametrize("backend, dtype, layout", list(_cases()))
def test_gddim_steps(backend, dtype, layout):
    """Consecutive gDDIM steps of a real table (both predictions, orders 1-3: the ring buffer wraps)."""
    _skip_unless(backend, dtype)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(15)
    u, y, b, d = _step_inputs(layout, dtype, dev, gen)
    ts = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.02], dtype=torch.float64)
    for order, predict in ((1, "eps"), (2, "x0"), (3, "eps"), (3, "x0")):
        table = gddim_table(SDE, ts, order, predict, mixed=True).to(dev)
        a, r = u.clone(memory_format=torch.preserve_format), _c(u)
        ha, hr = cf.gddim_history(a, order, predict), cf.gddim_history(r, order, predict)
        for step in range(table.shape[0]):
            yy = y * (1.0 + 0.1 * step)
            cf.gddim_step_(a, yy, ha, table, step=step, backend=backend)
            cf.gddim_step_(r, _c(yy), hr, table, step=step, backend="torch")
            _close(a, r, dtype)
            _close(ha, hr, dtype)


def _guided_cases():
    for backend in ("torch", "cpu", "triton", "cuda"):
        for dtype, net in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float64, torch.float64)):
            yield pytest.param(backend, dtype, net, id=f"{backend}-{str(dtype)[6:]}-y={str(net)[6:]}")


def _guided_inputs(dtype, net, dev, gen):
    """A state u (3, 6, 5, 3) (odd D = 45) and the two halves of one batch-doubled network output
    (6, 3, 5, 3) that is itself a strided slice: cond, uncond are views with column stride 2."""
    b = 3
    u = torch.randn(b, 6, 5, 3, generator=gen, dtype=dtype).to(dev)
    doubled = torch.randn(2 * b, 3, 5, 6, generator=gen).to(dev, net)[..., ::2]
    cond, uncond = doubled[:b], doubled[b:]
    assert not cond.is_contiguous() and cond.data_ptr() != uncond.data_ptr()
    return u, cond, uncond, b, 45


def _combined64(cond, uncond, w):
    """The classifier-free combination (1 + w) cond - w uncond in float64, written out independently."""
    return (1.0 + w) * cond.double() - w * uncond.double()


def _close_to_float64(got, want, dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("backend, dtype, net", list(_guided_cases()))
def test_guided_sampler_steps_against_float64_reference(backend, dtype, net):
    """sscs_step_ / em_step_ (em and denoise) with y_uncond: the step of the combined output y + w (y - y_uncond),
    against the float64 torch reference fed the combination computed in float64; the halves are strided views."""
    _skip_unless(backend, dtype)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(21)
    u, cond, uncond, b, d = _guided_inputs(dtype, net, dev, gen)
    ts = torch.tensor([1.0, 0.7, 0.45, 0.2, 0.05], dtype=torch.float64, device=dev)
    eps4 = torch.randn(b, 4, d, generator=gen, dtype=torch.float64).to(dev)
    eps1 = torch.randn(b, d, generator=gen, dtype=torch.float64).to(dev)
    calls = (
        lambda w, yy, be, **g: cf.sscs_step_(w, yy, ts, SDE, step=1, mixed=True, eps=eps4.to(w.dtype), backend=be, **g),
        lambda w, yy, be, **g: cf.sscs_step_(w, yy, ts, SDE, step=3, mixed=False, backend=be, **g),
        lambda w, yy, be, **g: cf.em_step_(w, yy, ts, SDE, step=2, mixed=True, eps=eps1.to(w.dtype), backend=be, **g),
        lambda w, yy, be, **g: cf.em_step_(w, yy, ts, SDE, step=0, mixed=True, denoise=True, backend=be, **g),
    )
    for weight in (0.0, 2.5):
        want_y = _combined64(cond, uncond, weight)
        for call in calls:
            got, want = u.clone(), u.double().clone()
            call(got, cond, backend, y_uncond=uncond, guide_weight=weight)
            call(want, want_y, "torch")
            _close_to_float64(got, want, dtype)


@pytest.mark.parametrize("backend, dtype, net", list(_guided_cases()))
def test_guided_gddim_steps_against_float64_reference(backend, dtype, net):
    """Consecutive guided gDDIM steps (order 3: the ring wraps) against the float64 reference fed the combination."""
    _skip_unless(backend, dtype)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(22)
    u, cond, uncond, b, d = _guided_inputs(dtype, net, dev, gen)
    ts = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.02], dtype=torch.float64)
    table = gddim_table(SDE, ts, 3, "eps", mixed=True).to(dev)
    a, r = u.clone(), u.double().clone()
    ha, hr = cf.gddim_history(a, 3), cf.gddim_history(r, 3)
    for step in range(table.shape[0]):
        cf.gddim_step_(a, cond, ha, table, step=step, backend=backend, y_uncond=uncond, guide_weight=1.5)
        cf.gddim_step_(r, _combined64(cond, uncond, 1.5), hr, table, step=step, backend="torch")
        _close_to_float64(a, r, dtype)
        _close_to_float64(ha, hr, dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_guidance_arguments_are_checked(backend):
    _skip_unless(backend, torch.float32)
    u, y = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    ts = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    with pytest.raises(ValueError, match="y_uncond must have y's shape and dtype"):
        cf.sscs_step_(u, y, ts, SDE, step=0, backend=backend, y_uncond=y[:, :2], guide_weight=1.0)
    with pytest.raises(ValueError, match="y_uncond must have y's shape and dtype"):
        cf.em_step_(u, y, ts, SDE, step=0, backend=backend, y_uncond=y.double(), guide_weight=1.0)
    with pytest.raises(ValueError, match="guide_weight must be a finite real number"):
        cf.gddim_step_(u, y, cf.gddim_history(u, 1), gddim_table(SDE, ts, 1), step=0, backend=backend,
                       y_uncond=y, guide_weight=float("inf"))
    with pytest.raises(TypeError, match="y_uncond must be a tensor"):
        cf.sscs_step_(u, y, ts, SDE, step=0, backend=backend, y_uncond=[1.0], guide_weight=1.0)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_low_precision_network_outputs(backend):
    """bf16 / fp16 network outputs with a float32 state: within 1e-2 of the float64 reference."""
    _skip_unless(backend, torch.float32)
    dev = _device(backend)
    gen = torch.Generator().manual_seed(14)
    b, c = 4, 3
    x0 = torch.randn(b, c, 4, 4, generator=gen).to(dev)
    t = _times(b, gen, dev)
    eps = torch.randn(b, 2, c * 16, generator=gen).to(dev)
    u, noise = cf.perturb(x0, t, SDE, eps=eps, backend=backend)
    u64, noise64 = cf.perturb(x0.double(), t, SDE, eps=eps.double(), backend="torch")
    ts = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64, device=dev)
    for odt in (torch.bfloat16, torch.float16):
        out = torch.randn(b, c, 4, 4, generator=gen).to(dev, odt)
        o = out.clone().requires_grad_(True)
        loss = cf.hsm_loss(o, u, t, SDE, noise, reduction="none", backend=backend)
        o64 = out.double().requires_grad_(True)
        ref = cf.hsm_loss(o64, u64, t, SDE, noise64, reduction="none", backend="torch")
        torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=1e-2, atol=1e-2)
        loss.sum().backward()
        ref.sum().backward()
        assert o.grad.dtype == odt
        torch.testing.assert_close(o.grad.double().cpu(), o64.grad.cpu(), rtol=1e-2, atol=1e-2)
        a, r = u.clone(), u64.clone()
        cf.sscs_step_(a, out, ts, SDE, step=0, mixed=True, backend=backend)
        cf.sscs_step_(r, out.double(), ts, SDE, step=0, mixed=True, backend="torch")
        torch.testing.assert_close(a.double().cpu(), r.cpu(), rtol=1e-2, atol=1e-2)


# ---- out-of-range steps: the same error everywhere with value checks on ----------------------------
STEP_CALLS = {
    "half_step_": lambda u, y, ts, step, b: cf.half_step_(u, ts, SDE, step=step, backend=b),
    "sscs_step_": lambda u, y, ts, step, b: cf.sscs_step_(u, y, ts, SDE, step=step, mixed=True, backend=b),
    "em_step_": lambda u, y, ts, step, b: cf.em_step_(u, y, ts, SDE, step=step, backend=b),
    "gddim_step_": lambda u, y, ts, step, b: cf.gddim_step_(u, y, cf.gddim_history(u, 2), gddim_table(SDE, 
        ts.cpu(), denoise=False).to(ts.device), step=step, backend=b),
}


@pytest.mark.parametrize("op", sorted(STEP_CALLS))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("step", [-1, 4, 2**40])
def test_out_of_range_step_is_one_error_on_every_backend(op, backend, step):
    """ts of 5 points: valid steps 0..3. Int or tensor step, value checks on: one ValueError everywhere.
    Value checks off (tensor step read in-kernel): GPU kernels write NaN, never read outside ts."""
    if backend != "torch":
        _skip_unless(backend, torch.float32)
    dev = _device(backend)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 4, 5, generator=g).to(dev)
    y = torch.randn(3, 2, 5, generator=g).to(dev)
    ts = torch.linspace(1.0, 0.1, 5, dtype=torch.float64, device=dev)
    msg = (rf"{op}: step = {step} is out of range for a table of 4 rows \(valid 0\.\.3\)" if op == "gddim_step_" else
           rf"{op}: step = {step} is out of range for a time grid ts of 5 points \(valid 0\.\.3\)")
    for s in (step, torch.tensor([step], device=dev)):
        with pytest.raises(ValueError, match=msg):
            STEP_CALLS[op](u.clone(), y, ts, s, backend)
    with cf.value_checks(False):
        w = u.clone()
        if backend in ("torch", "cpu"):
            with pytest.raises((ValueError, RuntimeError), match="out of range"):
                STEP_CALLS[op](w, y, ts, torch.tensor([step], device=dev), backend)
        else:
            STEP_CALLS[op](w, y, ts, torch.tensor([step], device=dev), backend)
            assert bool(w.isnan().all())
