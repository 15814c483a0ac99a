"""Every kernel op declared once: name, schema, mutated arguments, fake (meta) kernel, torch reference.

Each backend registers implementations against these declarations and nothing else:

* ``cpu`` / ``cuda``: the schemas are defined here in the ``cld_fast`` namespace
  (``torch.ops.cld_fast.<name>``); ``csrc/cpu/ops_cpu.cpp`` and ``csrc/cuda/ops_cuda.cpp`` only add
  ``TORCH_LIBRARY_IMPL`` kernels for the CPU and CUDA dispatch keys.
* ``triton``: the same schemas in the ``cld_fast_triton`` namespace (``triton_op`` on a GPU,
  ``custom_op`` under ``TRITON_INTERPRET=1``), bodies in ``cld_fast/triton_kernels``.
* ``torch``: the ``reference`` functions below, plain PyTorch on any device; every other backend is
  tested against them (``tests/test_ops_contract.py``).

Argument conventions shared by all ops (B samples, D elements of one sample's x):

    u      (B, 2, D) state view, x = u[:, 0], v = u[:, 1]; float32 or float64 (the state dtype)
    x0, v0 (B, D) data / initial velocity, state dtype
    out, y (B, D) network output or score: float32, bfloat16, float16 (float64 with a float64 state)
    t      (B,) forward times, float32 or float64, any stride (an expanded scalar works)
    ts     (S + 1,) forward-time grid of a sampler, float32 or float64, decreasing
    step   (1,) int64 on the data's device: the interval [ts[step], ts[step + 1]] (read in-kernel)
    sde    (5,) float64 CLD parameters in the order of ``cld_fast.sde.PARAMS``
           (``cld_fast.sde.kernel_params``), read in-kernel: every kernel derives its own
           coefficients from (t, sde) with the formulas of ``cld_fast.sde``
    eps    explicit noise in the state dtype; seed (1,) int64 for in-kernel Philox
           (``cld_fast.philox``: the op's tag, counter word c2 = step, 0 for perturb); neither: none
    obs    optional inpainting condition (B, 2, D) or (B, 4, D) in the state dtype: x_obs, mask (1 =
           observed, 0 = free) and, in explicit-noise mode, the replacement noise (z_x, z_v); without
           those two channels the replacement draws (z0, z1) of Philox tag INPAINT at the op's step
           when ``seed`` is given ((z2, z3) for half_step_), else none (the mean). After the op's update,
           every observed element's (x, v) is replaced by A(t_r) (x_obs, 0) + L(t_r) (z_x, z_v), the HSM
           perturbation of x_obs (v0 ~ N(0, gamma M) marginalised) at the forward time t_r the op
           leaves the state at; a denoising step (affine kind denoise, the gDDIM row past the grid)
           sets x = x_obs exactly and keeps v
    y_uncond, guide_weight  optional classifier-free guidance of the step ops that read y: y_uncond has
           y's shape and dtype (the unconditional half of a batch-doubled network output) and the op
           reads y + guide_weight (y - y_uncond) in place of y, each term cast to the compute dtype
           first (the state dtype; gDDIM: the state dtype, then float64). The combination of raw
           mixed-score outputs equals the combination of the scores (the c0 v term is common), so the
           guided score costs no launch of its own
    int enums: objective (``sde.OBJECTIVE_CODES``), weighting (``sde.WEIGHTING_CODES``),
           output (``sde.OUTPUT_CODES``), kind (``sde.AFFINE_KINDS``)

Ops (noise tags in brackets; sscs_step_, affine_step and gddim_step_ take the guidance pair
y_uncond, guide_weight):

    perturb       out <- A(t) (x0, v0) + L(t) (z0, z1)                                   [PERTURB]
    hsm_loss_fwd  scale * w(t) * sum_d (a(t) out + c(t) v - eps_v)^2, per sample (reduction 0, (B,))
                  or summed over samples (reduction 1, 0-d); in the state dtype; (c, w, a) of
                  ``CLD.loss_coefficients(t, weighting, objective, output)``
    hsm_loss_bwd  d loss / d out = 2 scale w grad a (a out + c v - eps_v); grad 0-d or (B,)
    hsm_loss_fwd_grad  hsm_loss_fwd's loss, and into grad_out (B, D) in out's dtype the gradient for
                  grad = 1, from one pass that draws eps_v once (the loss's backward then scales it)
    mixed_score   c0(t) v + c1(t) out, (c0, c1) of ``CLD.score_coefficients(t, objective, output)``
                  (default codes: -v / s_vv(t) - out / l22(t))                           (B, D)
    half_step_    u <- reverse linear half step from ts[step] to ts[step + 1]            [HALF_STEP]
                  (obs: t_r = ts[step + 1])
    sscs_step_    SSCS after a network evaluation at ts[i], i = step: v <- alpha v + kappa y, the
                  closing half step (ts[i] - h/2 -> ts[i + 1]) with (z0, z1), the opening half step
                  of step i + 1 (ts[i + 1] -> ts[i + 1] - h_{i+1}/2) with (z2, z3) when i + 2 <= S
                  (else nothing); ``mixed`` folds the mixed score so y is the network output;
                  ``official_half``: the closing half step spans ts[i] -> ts[i] - h/2 instead
                  (``CLD.sscs_closing_half_step``, the official sampler's beta integral) [SSCS]
                  (obs: t_r = ts[i + 1] - h_{i+1}/2, the end of the opening half step; ts[i + 1]
                  when i + 2 > S)
    affine_step   out <- (c_xx x + c_xv v, c_vx x + c_vv v + c_vy y + sigma z0) for the step
                  ts[step] -> ts[step + 1]: kind em (noise), denoise (none), pf_drift (the
                  forward-time ODE drift at ts[step]; ts[step + 1] is not read)            [AFFINE]
                  (obs: em t_r = ts[step + 1]; denoise x = x_obs; pf_drift takes no obs, no y_uncond)
    gddim_step_   exponential-integrator multistep after a network evaluation (float64 arithmetic), row r = table[step]
                  of ``cld_fast.samplers.gddim.gddim_table``: cur = E (x, v, y); u <- Lin u + C_0 cur + sum_j C_j
                  hist[(step - j) mod K]; hist[step mod K] <- cur. hist (K, B, H, D) in the state
                  dtype keeps the last K = order - 1 values of cur (H = 2: eps_R; H = 1: x0_hat)
                  (obs, with the run's ts, sde and seed: t_r = ts[step + 1]; step + 1 = len(ts)
                  is the denoising row, x = x_obs)

A step outside the grid (step < 0, or step + 1 >= len(ts); pf_drift: step >= len(ts)) is an error
where the step is known on the host (``cld_fast.ops`` checks CPU steps) and poisons the output
with NaN in device kernels (no host synchronisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from . import philox
from .sde import AFFINE_KINDS, CLD, OBJECTIVES, OUTPUTS, WEIGHTINGS, cld_from_params

NAMESPACE = "cld_fast"
TRITON_NAMESPACE = "cld_fast_triton"


@dataclass(frozen=True)
class OpDef:
    """One op: ``schema`` is the argument list and return (without the name), as torch.library takes it."""

    name: str
    schema: str
    mutates: Tuple[str, ...]
    fake: Callable
    reference: Callable

    def qualified_schema(self) -> str:
        return f"{self.name}{self.schema}"


# ---- torch references ---------------------------------------------------------------------------


def _cld(sde: torch.Tensor) -> CLD:
    return cld_from_params(sde)


def _col(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1)


def _normals(shape_bd, seed, step, tag, count, dtype):
    b, d = shape_bd
    z = philox.philox_normals(b * d, seed, step, tag, device=seed.device)
    return z[:count].view(count, b, d).to(dtype)


def _at(ts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """ts[index] as a (1,) float64 tensor, read on the device (no host sync)."""
    return ts.index_select(0, index.reshape(1)).to(torch.float64)


def loss_coefficients_from(sde: torch.Tensor, t: torch.Tensor, weighting: int, objective: int = 0,
                           output: int = 0) -> torch.Tensor:
    """(B, 3) float64 (c, w, a) of the loss for the kernel arguments (sde params tensor, enum codes)."""
    return _cld(sde).loss_coefficients(t.to(torch.float64), WEIGHTINGS[weighting], OBJECTIVES[objective],
                                       OUTPUTS[output])


def perturb_ref(x0, v0, t, sde, objective, eps, seed, out):
    cld = _cld(sde)
    k = cld.perturbation_kernel(t.to(torch.float64), "dsm" if objective == 1 else "hsm")
    dt = out.dtype
    if eps is not None:
        ex, ev = eps[:, 0].to(dt), eps[:, 1].to(dt)
    elif seed is not None:
        ex, ev = _normals(x0.shape, seed, torch.zeros_like(seed), philox.TAG_PERTURB, 2, dt)
    else:
        ex = ev = None
    c = [_col(f).to(dt) for f in (k.a_xx, k.a_xv, k.a_vx, k.a_vv, k.l11, k.l21, k.l22)]
    x0 = x0.to(dt)
    mx, mv = c[0] * x0, c[2] * x0
    if v0 is not None:
        mx = mx + c[1] * v0.to(dt)
        mv = mv + c[3] * v0.to(dt)
    if ex is not None:
        mx = mx + c[4] * ex
        mv = mv + c[5] * ex + c[6] * ev
    out[:, 0] = mx
    out[:, 1] = mv


def _loss_residual(out, u, t, sde, weighting, scale, eps_v, seed, objective, output):
    """(r, scale * w, a): r = a out + c v - eps_v per element, in the state dtype."""
    acc = u.dtype
    cwa = loss_coefficients_from(sde, t, weighting, objective, output).to(acc)
    v = u[:, 1].to(acc)
    if eps_v is None:
        eps_v = _normals(v.shape, seed, torch.zeros_like(seed), philox.TAG_PERTURB, 2, acc)[1]
    r = cwa[:, 2:3] * out.to(acc) + cwa[:, 0:1] * v - eps_v.to(acc)
    return r, cwa[:, 1] * scale, cwa[:, 2:3]


def hsm_loss_fwd_ref(out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective=0, output=0):
    r, w, _ = _loss_residual(out, u, t, sde, weighting, scale, eps_v, seed, objective, output)
    per_sample = w * (r * r).sum(dim=1)
    return per_sample.sum() if reduction == 1 else per_sample


def hsm_loss_bwd_ref(grad, out, u, t, sde, weighting, scale, eps_v, seed, objective=0, output=0):
    r, w, a = _loss_residual(out, u, t, sde, weighting, scale, eps_v, seed, objective, output)
    g = grad.to(r.dtype).expand(u.shape[0])
    return ((2.0 * (w * g)).unsqueeze(1) * (a * r)).to(out.dtype)


def hsm_loss_fwd_grad_ref(out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective, output, grad_out):
    r, w, a = _loss_residual(out, u, t, sde, weighting, scale, eps_v, seed, objective, output)
    grad_out.copy_(((2.0 * w).unsqueeze(1) * (a * r)).to(grad_out.dtype))
    per_sample = w * (r * r).sum(dim=1)
    return per_sample.sum() if reduction == 1 else per_sample


def mixed_score_ref(out, u, t, sde, objective=0, output=0):
    c = _cld(sde).score_coefficients(t.to(torch.float64), OBJECTIVES[objective], OUTPUTS[output]).to(u.dtype)
    return c[:, 0:1] * u[:, 1] + c[:, 1:2] * out.to(u.dtype)


def _linear(x, v, r, ex, ev):
    """Half step with r = (a_xx a_xv a_vx a_vv l11 l21 l22), (1, 7) in the state dtype."""
    nx = r[:, 0:1] * x + r[:, 1:2] * v
    nv = r[:, 2:3] * x + r[:, 3:4] * v
    if ex is not None:
        nx = nx + r[:, 4:5] * ex
        nv = nv + r[:, 5:6] * ex + r[:, 6:7] * ev
    return nx, nv


def guided_output(y, y_uncond, guide_weight, dtype):
    """The network output a step op reads, in ``dtype``: y, or the classifier-free combination
    y + w (y - y_uncond) of the conditional and unconditional halves (the rule every backend follows)."""
    y = y.to(dtype)
    if y_uncond is None:
        return y
    return y + guide_weight * (y - y_uncond.to(dtype))


def _replace_obs(x, v, obs, t_r, cld, seed, step, pair):
    """(x, v) with the observed elements replaced by the HSM perturbation of x_obs at t_r ((1,) float64).

    ``t_r`` None: the denoising rule, x = x_obs, v kept. ``pair``: which Philox normals (0: z0, z1;
    1: z2, z3) of tag INPAINT the seed mode takes.
    """
    if obs is None:
        return x, v
    dt = x.dtype
    xo, keep = obs[:, 0].to(dt), obs[:, 1] != 0
    if t_r is None:
        return torch.where(keep, xo, x), v
    k = cld.perturbation_kernel(t_r, "hsm")
    c = [_col(f).to(dt) for f in (k.a_xx, k.a_vx, k.l11, k.l21, k.l22)]
    rx, rv = c[0] * xo, c[1] * xo
    if obs.shape[1] == 4:
        zx, zv = obs[:, 2].to(dt), obs[:, 3].to(dt)
    elif seed is not None:
        zx, zv = _normals(x.shape, seed, step, philox.TAG_INPAINT, 4, dt)[2 * pair:2 * pair + 2]
    else:
        zx = zv = None
    if zx is not None:
        rx = rx + c[2] * zx
        rv = rv + c[3] * zx + c[4] * zv
    return torch.where(keep, rx, x), torch.where(keep, rv, v)


def half_step_ref(u, ts, step, sde, eps, seed, obs=None):
    cld = _cld(sde)
    t0, t1 = _at(ts, step), _at(ts, step + 1)
    r = cld.half_step_coefficients(t0, t0 - t1).to(u.dtype)
    if eps is not None:
        ex, ev = eps[:, 0].to(u.dtype), eps[:, 1].to(u.dtype)
    elif seed is not None:
        ex, ev = _normals(u[:, 0].shape, seed, step, philox.TAG_HALF_STEP, 2, u.dtype)
    else:
        ex = ev = None
    nx, nv = _linear(u[:, 0], u[:, 1], r, ex, ev)
    nx, nv = _replace_obs(nx, nv, obs, t1, cld, seed, step, 1)
    u[:, 0] = nx
    u[:, 1] = nv


def sscs_step_ref(u, y, ts, step, sde, mixed, eps, seed, official_half=False, obs=None, y_uncond=None,
                  guide_weight=0.0):
    cld = _cld(sde)
    last = ts.numel() - 1
    t0, t1 = _at(ts, step), _at(ts, step + 1)
    h = t0 - t1
    mix = cld.mixed_score_coefficients(t0) if mixed else None
    ak = cld.score_step_coefficients(t0, h, mixed=mix).to(u.dtype)
    closing = cld.half_step_coefficients(*cld.sscs_closing_half_step(t0, t1, official_half)).to(u.dtype)
    t2 = _at(ts, torch.clamp(step + 2, max=last))
    opening = cld.half_step_coefficients(t1, 0.5 * (t1 - t2))
    identity = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64, device=ts.device)
    opening = torch.where((step + 2 <= last).reshape(1, 1), opening, identity).to(u.dtype)
    if eps is not None:
        z = [eps[:, j].to(u.dtype) for j in range(4)]
    elif seed is not None:
        z = list(_normals(u[:, 0].shape, seed, step, philox.TAG_SSCS, 4, u.dtype))
    else:
        z = [None] * 4
    v = ak[:, 0:1] * u[:, 1] + ak[:, 1:2] * guided_output(y, y_uncond, guide_weight, u.dtype)
    x, v = _linear(u[:, 0], v, closing, z[0], z[1])
    x, v = _linear(x, v, opening, z[2], z[3])
    t_r = torch.where((step + 2 <= last).reshape(1), t1 - 0.5 * (t1 - t2), t1)
    x, v = _replace_obs(x, v, obs, t_r, cld, seed, step, 0)
    u[:, 0] = x
    u[:, 1] = v


def affine_step_ref(u, y, ts, step, sde, kind, mixed, eps, seed, out, obs=None, y_uncond=None, guide_weight=0.0):
    cld = _cld(sde)
    name = AFFINE_KINDS[kind]
    t0 = _at(ts, step)
    h = t0 - _at(ts, step + 1) if name != "pf_drift" else torch.zeros_like(t0)
    mix = cld.mixed_score_coefficients(t0) if mixed else None
    r = cld.reverse_affine_coefficients(t0, h, name, mixed=mix).to(out.dtype)
    x, v = u[:, 0].to(out.dtype), u[:, 1].to(out.dtype)
    nx = r[:, 0:1] * x + r[:, 1:2] * v
    if name == "pf_drift" and y_uncond is not None:
        raise ValueError("affine_step: the pf_drift kind takes no y_uncond (guidance of the ODE drift is unfused)")
    nv = r[:, 2:3] * x + r[:, 3:4] * v + r[:, 4:5] * guided_output(y, y_uncond, guide_weight, out.dtype)
    if name == "em":
        if eps is not None:
            nv = nv + r[:, 5:6] * eps.to(out.dtype)
        elif seed is not None:
            nv = nv + r[:, 5:6] * _normals(x.shape, seed, step, philox.TAG_AFFINE, 1, out.dtype)[0]
    if name == "em":
        nx, nv = _replace_obs(nx, nv, obs, _at(ts, step + 1), cld, seed, step, 0)
    elif name == "denoise":
        nx, nv = _replace_obs(nx, nv, obs, None, cld, seed, step, 0)
    out[:, 0] = nx
    out[:, 1] = nv


def gddim_step_ref(u, hist, y, table, step, ts=None, sde=None, seed=None, obs=None, y_uncond=None,
                   guide_weight=0.0):
    # float64 arithmetic for every state dtype (stored back in the state dtype): in the first rows Lin u and
    # C_0 cur cancel with terms ~1e6 where a(t) is tiny, which float32 arithmetic turns into O(0.1) errors
    f64 = torch.float64
    r = table.index_select(0, step.reshape(1)).to(f64)  # (1, GDDIM_COLS)
    x, v, yy = u[:, 0].to(f64), u[:, 1].to(f64), guided_output(y, y_uncond, guide_weight, u.dtype).to(f64)
    cx = r[:, 0:1] * x + r[:, 1:2] * v + r[:, 2:3] * yy
    cv = r[:, 3:4] * x + r[:, 4:5] * v + r[:, 5:6] * yy
    nx = r[:, 6:7] * x + r[:, 7:8] * v + r[:, 10:11] * cx + r[:, 11:12] * cv
    nv = r[:, 8:9] * x + r[:, 9:10] * v + r[:, 12:13] * cx + r[:, 13:14] * cv
    k, channels = hist.shape[0], hist.shape[2]
    for j in range(1, k + 1):  # the j-th previous evaluation sits in slot (step - j) mod k
        h = hist.index_select(0, torch.remainder(step.reshape(1) - j, k)).squeeze(0).to(f64)
        c = 10 + 4 * j
        nx = nx + r[:, c:c + 1] * h[:, 0]
        nv = nv + r[:, c + 2:c + 3] * h[:, 0]
        if channels == 2:
            nx = nx + r[:, c + 1:c + 2] * h[:, 1]
            nv = nv + r[:, c + 3:c + 4] * h[:, 1]
    if k:
        cur = torch.stack([cx, cv], 1)[:, :channels].to(hist.dtype)
        hist.index_copy_(0, torch.remainder(step.reshape(1), k), cur.unsqueeze(0))
    nx, nv = nx.to(u.dtype), nv.to(u.dtype)
    if obs is not None:
        nx, nv = _gddim_replace(nx, nv, obs, ts, step, sde, seed)
    u[:, 0] = nx
    u[:, 1] = nv


def _gddim_replace(x, v, obs, ts, step, sde, seed):
    """The gDDIM step's replacement: at ts[step + 1], or the denoising rule when step + 1 = len(ts)."""
    n = ts.numel()
    exact = (step + 1 >= n).reshape(1)
    t_r = _at(ts, torch.clamp(step + 1, max=n - 1))
    cld = _cld(sde)
    rx, rv = _replace_obs(x, v, obs, t_r, cld, seed, step, 0)
    ex, ev = _replace_obs(x, v, obs, None, cld, seed, step, 0)
    return torch.where(exact, ex, rx), torch.where(exact, ev, rv)


# ---- fakes (shapes and dtypes only) -------------------------------------------------------------


def _none(*args, **kwargs) -> None:
    return None


def _hsm_loss_fwd_fake(out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective, output):
    shape = () if reduction == 1 else (u.shape[0],)
    return u.new_empty(shape)


def _hsm_loss_bwd_fake(grad, out, u, t, sde, weighting, scale, eps_v, seed, objective, output):
    return out.new_empty((u.shape[0], u.shape[2]))


def _hsm_loss_fwd_grad_fake(out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective, output, grad_out):
    return _hsm_loss_fwd_fake(out, u, t, sde, weighting, scale, reduction, eps_v, seed, objective, output)


def _mixed_score_fake(out, u, t, sde, objective, output):
    return u.new_empty((u.shape[0], u.shape[2]))


def _def(name, schema, mutates, fake, reference) -> OpDef:
    return OpDef(name, schema, tuple(mutates), fake, reference)


OPS: Dict[str, OpDef] = {d.name: d for d in (
    _def("perturb",
         "(Tensor x0, Tensor? v0, Tensor t, Tensor sde, int objective, Tensor? eps, Tensor? seed, Tensor(a!) out) -> ()",
         ("out",), _none, perturb_ref),
    _def("hsm_loss_fwd",
         "(Tensor out, Tensor u, Tensor t, Tensor sde, int weighting, float scale, int reduction, Tensor? eps_v, "
         "Tensor? seed, int objective, int output) -> Tensor",
         (), _hsm_loss_fwd_fake, hsm_loss_fwd_ref),
    _def("hsm_loss_bwd",
         "(Tensor grad, Tensor out, Tensor u, Tensor t, Tensor sde, int weighting, float scale, Tensor? eps_v, "
         "Tensor? seed, int objective, int output) -> Tensor",
         (), _hsm_loss_bwd_fake, hsm_loss_bwd_ref),
    _def("hsm_loss_fwd_grad",
         "(Tensor out, Tensor u, Tensor t, Tensor sde, int weighting, float scale, int reduction, Tensor? eps_v, "
         "Tensor? seed, int objective, int output, Tensor(a!) grad_out) -> Tensor",
         ("grad_out",), _hsm_loss_fwd_grad_fake, hsm_loss_fwd_grad_ref),
    _def("mixed_score", "(Tensor out, Tensor u, Tensor t, Tensor sde, int objective, int output) -> Tensor", (),
         _mixed_score_fake, mixed_score_ref),
    _def("half_step_",
         "(Tensor(a!) u, Tensor ts, Tensor step, Tensor sde, Tensor? eps, Tensor? seed, Tensor? obs=None) -> ()",
         ("u",), _none, half_step_ref),
    _def("sscs_step_",
         "(Tensor(a!) u, Tensor y, Tensor ts, Tensor step, Tensor sde, bool mixed, Tensor? eps, Tensor? seed, "
         "bool official_half, Tensor? obs=None, Tensor? y_uncond=None, float guide_weight=0.0) -> ()",
         ("u",), _none, sscs_step_ref),
    _def("affine_step",
         "(Tensor u, Tensor y, Tensor ts, Tensor step, Tensor sde, int kind, bool mixed, Tensor? eps, Tensor? seed, "
         "Tensor(a!) out, Tensor? obs=None, Tensor? y_uncond=None, float guide_weight=0.0) -> ()",
         ("out",), _none, affine_step_ref),
    _def("gddim_step_",
         "(Tensor(a!) u, Tensor(b!) hist, Tensor y, Tensor table, Tensor step, Tensor? ts=None, Tensor? sde=None, "
         "Tensor? seed=None, Tensor? obs=None, Tensor? y_uncond=None, float guide_weight=0.0) -> ()",
         ("u", "hist"), _none, gddim_step_ref),
)}


# ---- the cld_fast namespace (implemented by csrc/ for the CPU and CUDA dispatch keys) -----------

_LIBRARY = {}


def define_library() -> bool:
    """Define every schema in the ``cld_fast`` namespace and register its fake, once per process.

    The compiled extension registers only implementations (``TORCH_LIBRARY_IMPL``), so it may be
    loaded before or after this runs. Returns False on a torch without ``torch.library.register_fake``
    (the ops then still run eagerly, but do not trace under torch.compile).
    """
    if "lib" in _LIBRARY:
        return _LIBRARY["fakes"]
    lib = torch.library.Library(NAMESPACE, "DEF")
    for d in OPS.values():
        lib.define(d.qualified_schema())
    fakes = hasattr(torch.library, "register_fake")
    if fakes:
        for d in OPS.values():
            torch.library.register_fake(f"{NAMESPACE}::{d.name}", d.fake, lib=lib)
    _LIBRARY["lib"], _LIBRARY["fakes"] = lib, fakes
    return fakes
