"""Triton kernels for the cld_fast ``triton`` backend (installed as ``cld_fast.triton_kernels``).

Modules (each: @triton.jit kernels, then a host launcher taking the arguments of its op's schema in
``cld_fast.opdefs``):

    coefficients   the CLD coefficients of cld_fast/sde.py as float64 jit helpers (+ ``probe``, ``LAYOUT``)
    philox         in-kernel noise of the ``cld_fast.philox`` contract (Philox4x32-10 + Box-Muller)
    perturb        u = A(t) (x0, v0) + L(t) eps straight into the network's input buffer
    hsm_loss       HSM loss forward (deterministic reduction) and backward
    sampler_steps  half_step_, sscs_step_, affine_step (time grid + device step tensor, NaN guard)
    mixed_score    score = -v / s_vv(t) - out / l22(t)
    _common        64-bit tile indexing, dtype helpers, launch configuration and the launch site

The torch.library registration lives in ``cld_fast.backends.triton_backend``.
"""
