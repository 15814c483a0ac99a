"""Triton kernels for the cld_fast ``triton`` backend (installed as ``cld_fast.triton_kernels``).

Modules (each: @triton.jit kernels, then a small launcher taking torch tensors):

    philox         in-kernel noise of the ``cld_fast.philox`` contract (Philox4x32-10 + Box-Muller)
    perturb        u = A (x0, v0) + L eps straight into the network's input buffer
    hsm_loss       HSM loss forward (deterministic per-sample sums) and backward
    sampler_steps  half_step_, sscs_step_, affine_step (table row chosen by a device step tensor)
    mixed_score    score = c0 v + c1 out
    _common        64-bit tile indexing and the fixed launch configurations

The backend contract and the torch.library registration live in ``cld_fast.backends.triton_backend``.
"""
