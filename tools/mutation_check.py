#!/usr/bin/env python
"""Plant known bugs one at a time and check that the targeted tests catch each of them.

A small mutation check, not a CI gate: every entry of ``MUTANTS`` names a file, an exact
piece of its text, the text that replaces it and the tests that must then fail. The repository is
copied once to a temporary folder (the built ``cld_fast/_C*.so`` included; the working tree is never
touched), each mutant is planted in the copy, its tests run with ``python -m pytest -x``, and the
file is restored. A C++ mutant (``rebuild=True``) rebuilds the extension in the copy first
(``MAX_JOBS=2 python setup.py build_ext --inplace``, minutes) and puts the original library back
afterwards. The kill table is printed and written as Markdown (``tools/mutation_results.md``).

    python tools/mutation_check.py                 # every mutant
    python tools/mutation_check.py --only S1 M12   # some of them
    python tools/mutation_check.py --no-cpp        # skip the mutants that need a rebuild
    python tools/mutation_check.py --list

Keep the list growing: when a bug slips through, add it here with the test that now catches it.
A mutant whose text is not found in its file is reported as STALE, not as killed.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tools", "mutation_results.md")

PARITY = "tests/test_official_parity.py"
REF = "tests/test_reference_steps.py"
BLOCKS = "tests/test_models_blocks.py"
EMA = "tests/test_ema.py"
CKPT = "tests/test_checkpoint.py"
RESUME = "tests/test_train_resume.py"
LOCK = "tests/test_runlock.py"
CLI = "tests/test_cli.py"
DATA = "tests/test_data.py"
RESUME_OLDER = "tests/test_train_resume.py"
NCSNPP = "tests/test_models_ncsnpp.py"
TRAIN = "tests/test_train.py"


@dataclass
class Mutant:
    id: str
    area: str
    file: str
    old: str
    new: str
    tests: Sequence[str]
    why: str
    rebuild: bool = False
    env: dict = field(default_factory=dict)


M = Mutant
MUTANTS: List[Mutant] = [
    # ---- the sampler, model, EMA and checkpoint code --------------------------------------------------
    M("S1", "sampling/torch", "cld_fast/sde.py",
      "        tc = t0 - 0.5 * h\n        return tc, tc - t1\n",
      "        tc = t0 - 0.5 * h\n        return t0, tc - t1\n",
      [REF, "-k", "torch"], "SSCS closing half step starts at t instead of t - h/2 (torch backend)"),
    M("S1t", "triton", "triton_kernels/coefficients.py",
      "        tc = t0 - 0.5 * h\n        hc = tc - t1\n",
      "        tc = t0\n        hc = t0 - 0.5 * h - t1\n",
      [REF, "-k", "triton"], "SSCS closing half step starts at t (Triton kernel)"),
    M("S1c", "C++ cpu", "csrc/include/cld_coefficients.h",
      "return SscsTimes{t0, h, t_close, t_close - t1, t1, 0.5 * (t1 - t2)};",
      "return SscsTimes{t0, h, t0, t_close - t1, t1, 0.5 * (t1 - t2)};",
      [REF, "-k", "cpu"], "SSCS closing half step starts at t (C++ kernels)", rebuild=True),
    M("S2", "sampling", "cld_fast/samplers/core.py",
      "        self.sde.denoise_(u, y, self.plan.eps, mixed=self.mixed, backend=self.backend, obs=self.obs, **guide)",
      "        None  # mutant: no denoising step",
      [REF], "final SSCS/EM denoising step is a no-op"),
    M("S3", "sampling", "cld_fast/samplers/ode.py",
      "        run.sde.denoise_(u, y, run.eps, mixed=ev.fold, backend=run.backend)",
      "        None  # mutant: no denoising step",
      [REF], "final ODE denoising step is a no-op"),
    M("S4", "sde", "cld_fast/sde.py", "c_x = 1.0 + 0.5 * bh", "c_x = 1.0 - 0.5 * bh",
      [REF, "-k", "vpsde"], "sign of the VP-SDE Euler-Maruyama drift"),
    M("S5", "triton", "triton_kernels/perturb.py",
      "x0_ptr + rows * s_x0b + cols * s_x0d,", "x0_ptr + rows * s_x0b + cols,",
      ["tests/test_ops_contract.py", "-k", "triton and transposed and perturb"],
      "Triton perturb kernel ignores the x0 column stride"),
    M("S6", "models", "models/layers.py",
      "            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)\n        if not self.skip_rescale:\n"
      "            return x + h\n        return (x + h) / _SQRT2",
      "            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)\n        if not self.skip_rescale:\n"
      "            return x + h\n        return x + h",
      [BLOCKS, "-k", "ddpm"], "DDPM res-block drops its 1/sqrt(2)"),
    M("S7", "models", "models/ncsnpp.py", "pyramid = (pyramid + h) / sqrt2", "pyramid = pyramid + h",
      [BLOCKS, "-k", "progressive"], "progressive='residual' drops its 1/sqrt(2)"),
    M("S8", "ema", "cld_fast/ema.py", "return min(self.decay, (1.0 + n) / (10.0 + n))", "return (1.0 + n) / (10.0 + n)",
      [EMA], "EMA warm-up without its min(decay, ...) cap"),
    M("S9", "checkpoint", "cld_fast/checkpoint.py", '    torch.set_rng_state(states["torch_cpu"].cpu())',
      "    None  # mutant: global CPU RNG not restored",
      [RESUME, "-k", "dropout"], "resume does not restore the global CPU RNG"),
    M("S10", "checkpoint", "cld_fast/checkpoint.py", "            os.fsync(f.fileno())\n", "            pass\n",
      [CKPT, "-k", "fsync"], "no fsync of the file before the rename"),
    # ---- core math (cld_fast/sde.py) -------------------------------------------------------------------
    M("M1", "sde", "cld_fast/sde.py", "        a_vx = -c * b\n", "        a_vx = c * b\n",
      ["tests/test_sde.py", "tests/test_ops_torch.py"], "sign of the mean matrix entry a_vx"),
    M("M2", "sde", "cld_fast/sde.py", "s_vv = _q3(y) / (4.0 * g * g)", "s_vv = _q3(y) / (2.0 * g * g)",
      ["tests/test_sde.py"], "s_vv scale"),
    M("M3", "sde", "cld_fast/sde.py", "return self.beta0 * t + 0.5 * self.beta1 * t * t",
      "return self.beta0 * t + self.beta1 * t * t", ["tests/test_sde.py"], "B(t) without the 1/2"),
    M("M4", "sde", "cld_fast/sde.py", "w = self.beta(t).expand_as(c) * self.Gamma / (k.l22 * k.l22)",
      "w = self.beta(t).expand_as(c) * self.Gamma / k.l22", ["tests/test_sde.py", "-k", "mixed_and_loss"],
      "likelihood weighting divides by l22 once"),
    M("M5", "sde", "cld_fast/sde.py", "        c1 = -1.0 / k.l22\n",
      "        c1 = -1.0 / k.l11\n", ["tests/test_sde.py", "-k", "mixed_and_loss"],
      "mixed score uses l11 for l22"),
    M("M6", "sde", "cld_fast/sde.py", "alpha = 1.0 + e * self.m_inv", "alpha = 1.0 + e",
      ["tests/test_sde.py", REF, "-k", "torch or score_and_affine"], "SSCS score step without m_inv"),
    M("M7", "sde", "cld_fast/sde.py", "c_vv = 1.0 + G * mi * bh", "c_vv = 1.0 - G * mi * bh",
      [REF, "-k", "em"], "sign of the friction term of the reverse EM step"),
    M("M8", "sde", "cld_fast/sde.py", "            c_vy = -G * beta\n", "            c_vy = -2.0 * G * beta\n",
      [REF, "-k", "pf_drift"], "probability-flow ODE with the SDE's 2 Gamma beta score weight"),
    M("M9", "sde", "cld_fast/sde.py", 'sigma = torch.sqrt(2.0 * G * bh) if kind == "em"',
      'sigma = torch.sqrt(G * bh) if kind == "em"', [REF, "-k", "em"], "EM noise scale"),
    M("M10", "sde", "cld_fast/sde.py", "            c_s = -0.5 * beta\n", "            c_s = -beta\n",
      [REF, "-k", "vpsde"], "VP-SDE probability-flow score weight"),
    M("M11", "sde", "cld_fast/sde.py", "s = s_end * torch.flip(1.0 - (s / s_end) ** 2, dims=[0])",
      "s = s_end * torch.flip(1.0 - (s / s_end) ** 3, dims=[0])",
      ["tests/test_sampling.py", "-k", "striding"], "quadratic striding exponent"),
    M("M12", "sde", "cld_fast/sde.py", "l11, l21, l22 = _cholesky2(s_xx, -s_xv, s_vv)",
      "l11, l21, l22 = _cholesky2(s_xx, s_xv, s_vv)", [REF, "-k", "torch"], "half-step noise correlation sign"),
    M("M13", "sde", "cld_fast/sde.py", "k_x, k_v, k_y = p_vx / q, p_vv / q, 1.0 / q",
      "k_x, k_v, k_y = p_vx / q, p_vv / q, -1.0 / q", [REF, "-k", "gddim"], "Tweedie denoising score sign"),
    M("M14", "sde", "cld_fast/sde.py", "u.narrow(1, shape[1], shape[1]).mul_(math.sqrt(self.M))",
      "u.narrow(1, shape[1], shape[1]).mul_(self.M)", [REF, "-k", "sampler"], "prior velocity std M instead of sqrt(M)"),
    M("M15", "sampling", "cld_fast/samplers/gddim.py",
      "last[0:3] = sde.tweedie_coefficients(ts[-1] if denoise_time is None else float(denoise_time), mixed)",
      "last[0:3] = torch.tensor([1.0, 0.0, 0.0], dtype=f64)", [REF, "-k", "gddim"], "gDDIM denoising step is a no-op"),
    # ---- the torch backend (cld_fast/opdefs.py) and the ops --------------------------------------------
    M("M16", "ops/torch", "cld_fast/opdefs.py", "opening = cld.half_step_coefficients(t1, 0.5 * (t1 - t2))",
      "opening = cld.half_step_coefficients(t1, t1 - t2)", [REF, "-k", "torch"], "SSCS opening half step a full step"),
    M("M17", "losses", "cld_fast/opdefs.py", "r = cwa[:, 2:3] * out.to(acc) + cwa[:, 0:1] * v - eps_v.to(acc)",
      "r = cwa[:, 2:3] * out.to(acc) - cwa[:, 0:1] * v - eps_v.to(acc)", ["tests/test_ops_torch.py", "-k", "loss"],
      "HSM loss residual sign of the v term"),
    M("M18", "losses", "cld_fast/opdefs.py", "return ((2.0 * (w * g)).unsqueeze(1) * (a * r)).to(out.dtype)",
      "return ((w * g).unsqueeze(1) * (a * r)).to(out.dtype)", ["tests/test_ops_torch.py", "-k", "loss"],
      "HSM loss gradient without the factor 2"),
    M("M19", "losses", "cld_fast/ops.py", 'scale = 1.0 / b if reduction == "mean" else 1.0', "scale = 1.0",
      ["tests/test_ops_torch.py", "-k", "loss"], "loss reduction 'mean' sums"),
    M("M20", "ops/torch", "cld_fast/opdefs.py", "mv = mv + c[5] * ex + c[6] * ev", "mv = mv + c[6] * ev",
      ["tests/test_ops_torch.py", "-k", "perturb"], "perturb drops the l21 eps_x term"),
    # ---- Triton kernels -------------------------------------------------------------------------------
    M("M21", "triton", "triton_kernels/hsm_loss.py", "    factor = 2.0 * (w * g)\n", "    factor = w * g\n",
      ["tests/test_ops_contract.py", "-k", "triton and perturb_and_loss and contiguous"],
      "Triton HSM loss gradient without the factor 2"),
    M("M22", "triton", "triton_kernels/coefficients.py", "    return -1.0 / s_vv, -1.0 / l22\n",
      "    return -1.0 / s_vv, 1.0 / l22\n", ["tests/test_ops_contract.py", "-k", "triton and perturb_and_loss and contiguous"],
      "Triton mixed-score coefficient sign"),
    M("M23", "triton", "triton_kernels/coefficients.py",
      "h_open = tl.where(opening, 0.5 * (t1 - t2), 0.0)",
      "h_open = tl.where(opening, t1 - t2, 0.0)", [REF, "-k", "triton"],
      "Triton SSCS opening half step a full step"),
    # ---- C++ CPU kernels (rebuild) ---------------------------------------------------------------------
    M("M24", "C++ cpu", "csrc/include/cld_coefficients.h",
      "CLD_HD double beta_int(const Params& p, double t) { return p.beta0 * t + 0.5 * p.beta1 * t * t; }",
      "CLD_HD double beta_int(const Params& p, double t) { return p.beta0 * t + p.beta1 * t * t; }",
      [REF, "-k", "cpu"], "C++ B(t) without the 1/2 (invisible with beta1 = 0)", rebuild=True),
    # ---- samplers ---------------------------------------------------------------------------------------
    M("M25", "sampling", "cld_fast/samplers/sscs.py",
      "opening = torch.tensor([t0, t0 - 0.5 * (t0 - t1)], dtype=torch.float64)",
      "opening = torch.tensor([t0, t1], dtype=torch.float64)", [REF, "-k", "sscs_sampler"],
      "SSCS first opening half step a full step"),
    M("M26", "sde", "cld_fast/sde.py", "+ row[:, 2].view((-1,) + (1,) * (u.dim() - 1)) * z",
      "+ 0.5 * row[:, 2].view((-1,) + (1,) * (u.dim() - 1)) * z",
      [REF, "-k", "vpsde"], "VP-SDE EM noise halved"),
    M("M27", "sde", "cld_fast/sde.py", "        u.copy_(self._apply(u, y, row))\n", "        pass\n",
      [REF, "-k", "vpsde"], "VP-SDE denoising step is a no-op"),
    # ---- models -----------------------------------------------------------------------------------------
    M("M28", "models", "models/layers.py", "return torch.cat([h, y], dim=1)", "return torch.cat([y, h], dim=1)",
      [BLOCKS, "-k", "combine or input_skip"], "Combine 'cat' in the wrong order"),
    M("M29", "models", "models/ncsnpp.py", "input_pyramid = (input_pyramid + h) / sqrt2",
      "input_pyramid = input_pyramid + h", [BLOCKS, "-k", "input_residual"], "progressive_input='residual' drops 1/sqrt(2)"),
    M("M30", "models", "models/ncsnpp.py", "pyramid = pyramid + pyramid_h", "pyramid = pyramid_h",
      [BLOCKS, "-k", "output_skip"], "progressive='output_skip' forgets the upsampled pyramid"),
    M("M31", "models", "models/layers.py", "return F.conv2d(x, self.W.t()[:, :, None, None], self.b)",
      "return F.conv2d(x, self.W.t()[:, :, None, None])", [BLOCKS, "-k", "ddpm"], "NIN without its bias"),
    M("M32", "models", "models/layers.py",
      "        h = self.Conv_0(h)\n        if temb is not None:\n            h = h + self.Dense_0(self.act(temb))[:, :, None, None]\n"
      "        h = self.act(self.GroupNorm_1(h))\n        h = self.Dropout_0(h)",
      "        h = self.Conv_0(h)\n        if temb is not None:\n            h = h + self.Dense_0(temb)[:, :, None, None]\n"
      "        h = self.act(self.GroupNorm_1(h))\n        h = self.Dropout_0(h)",
      [BLOCKS, "-k", "ddpm"], "DDPM res-block time embedding without the activation"),
    # ---- EMA ----------------------------------------------------------------------------------------------
    M("M33", "ema", "cld_fast/ema.py", "torch._foreach_lerp_(self.shadow_params, params, 1.0 - decay)",
      "torch._foreach_lerp_(self.shadow_params, params, decay)", [EMA], "EMA weight swapped"),
    M("M34", "ema", "cld_fast/ema.py", "self.num_updates = None if n is None else int(n)",
      "self.num_updates = None if n is None else 0", [EMA], "EMA state loses its update count"),
    # ---- checkpoints and resume -------------------------------------------------------------------------
    M("M35", "checkpoint", "cld_fast/checkpoint.py", "    fsync_dir(directory)\n    return path",
      "    return path", [CKPT, "-k", "fsync"], "no directory fsync after the rename"),
    M("M36", "checkpoint", "cld_fast/checkpoint.py", "removed = found[:-keep] if len(found) > keep else []",
      "removed = found[:-keep + 1] if len(found) > keep else []", [CKPT, "-k", "keep_last"],
      "keep-last-N prunes one too many"),
    M("M37", "checkpoint", "cld_fast/checkpoint.py", '        generator.set_state(states["generator"].cpu())',
      "        None  # mutant", [CKPT, RESUME, "-k", "rng or dropout"],
      "resume does not restore the training generator"),
    M("M38", "checkpoint", "cld_fast/checkpoint.py",
      "            torch.save(obj, f)\n            f.flush()\n            os.fsync(f.fileno())\n        os.chmod(tmp,",
      "            torch.save(obj, f)\n            os.replace(tmp, path)\n            f.flush()\n            os.fsync(f.fileno())\n"
      "        tmp = path\n        os.chmod(tmp,",
      [CKPT, "-k", "crash or fsync"], "rename before the data are flushed and fsynced"),
    # ---- trainer ------------------------------------------------------------------------------------------
    M("M39", "train", "cld_fast/train.py", "        self.ema.update(self.params)\n", "",
      ["tests/test_train.py", "-k", "resume"], "trainer never updates the EMA"),
    M("M40", "train", "cld_fast/train.py",
      '        self.ema.load_state_dict(state["ema"])\n', "",
      ["tests/test_train.py", "-k", "resume"], "resume does not restore the EMA"),
    M("M41", "train", "cld_fast/train.py", "        self.step = int(state[\"step\"])\n",
      "        self.step = int(state[\"step\"]) + 1\n", ["tests/test_train.py", "-k", "resume"],
      "resume off by one step"),
    M("M42", "triton", "triton_kernels/perturb.py", "    mv = to_compute(a_vx, F64) * x0\n",
      "    mv = -to_compute(a_vx, F64) * x0\n", ["tests/test_ops_contract.py", "-k", "triton and perturb_and_loss and contiguous"],
      "Triton perturb mean sign of a_vx"),
    # ---- added with issues 14 and 16 ----------------------------------------------------------------------
    M("M43", "sde", "cld_fast/sde.py",
      "        s_vv = k.s_vv if objective == \"hsm\" else self.perturbation_kernel(t, \"hsm\").s_vv\n"
      "        return torch.stack([-1.0 / s_vv, c1], dim=-1)\n",
      "        return torch.stack([-1.0 / k.s_vv, c1], dim=-1)\n",
      [PARITY, "-k", "score_fn_matches_official_score and torch and dsm"],
      "DSM mixed score takes -v/s_vv from the DSM kernel instead of the HSM one"),
    M("M44", "sde", "cld_fast/sde.py", "            w = self.beta(t).expand_as(c) * self.Gamma\n",
      "            w = torch.ones_like(c)\n", [PARITY, "-k", "reweightedv1"],
      "reweightedv1 weight without beta(t) Gamma"),
    M("M45", "sampling", "cld_fast/sampling.py", "        bad = int((~torch.isfinite(run.u)).sum())\n",
      "        bad = 0\n", ["tests/test_sampling.py", "-k", "non_finite_samples"],
      "the sampler's final finiteness check removed"),
    M("M46", "train", "cld_fast/runlock.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
      "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)", ["tests/test_runlock.py", "-k", "exclusive"],
      "run-folder lock taken shared: two trainers on one folder"),
    # ---- the sampler wing and its adapters ---------------------------------------------------------
    M("P1", "sde", "cld_fast/sde.py", "k_v, k_y = k_v + c0 * k_y, c1 * k_y", "k_v, k_y = k_v - c0 * k_y, c1 * k_y",
      ["tests/test_sampling.py", "-k", "folded"], "gDDIM's fused mixed-score Tweedie row: sign of -v/s_vv"),
    M("P2", "sampling", "cld_fast/samplers/core.py", "                         and score_fn.sde == sde)",
      "                         )", ["tests/test_sampling.py", "-k", "another_cld"],
      "a score_fn of another CLD folded into the sampler's kernels"),
    M("P3", "sampling", "cld_fast/samplers/ode.py", "run.t_start, run.eps, run.rtol, run.atol,",
      "run.t_start, run.eps, run.atol, run.rtol,", ["tests/test_sampling.py", "-k", "tolerances"],
      "ODE rtol and atol swapped"),
    M("P4", "sampling", "cld_fast/samplers/ode.py", "budget = run.max_nfe - (1 if run.denoise else 0)",
      "budget = run.max_nfe", ["tests/test_sampling.py", "-k", "max_nfe_counts"],
      "ODE max_nfe without the denoising evaluation"),
    M("P5", "diffusers", "cld_fast/diffusers_scheduler.py",
      "self._stepper = self.spec.stepper(self.sde, plan, u, seed, self.config.mixed,",
      "self._stepper = self.spec.stepper(self.sde, plan, u, seed, True,",
      ["tests/test_diffusers_scheduler.py", "-k", "mixed_false"], "diffusers mixed=False stepped as mixed"),
    M("P6", "score", "cld_fast/score.py",
      "differentiable=self.is_differentiable,\n                            objective=self.objective, output=self.output)\n\n"
      "    def differentiable",
      "differentiable=self.is_differentiable)\n\n    def differentiable",
      ["tests/test_kdiffusion.py", "-k", "output_convention"], "k-diffusion extra_args drop the output convention"),
    M("P7", "diffusers", "cld_fast/diffusers_scheduler.py",
      "source = self._generator if self._generator is not None else generator", "source = self._generator",
      ["tests/test_diffusers_scheduler.py", "-k", "step_generator"], "diffusers step(generator=) ignored"),
    M("P8", "kdiffusion", "cld_fast/kdiffusion.py", "denoised = kc[0] * x + kc[1] * v + kc[2] * y.to(u.dtype)",
      "denoised = kc[0] * x + kc[1] * v - kc[2] * y.to(u.dtype)", ["tests/test_kdiffusion.py", "-k", "denoised"],
      "k-diffusion callback's denoised estimate with the wrong score sign"),
    M("P9", "sampling", "cld_fast/samplers/gddim.py", "        if plan.eps < MIN_EPS:", "        if False:",
      ["tests/test_gddim.py", "-k", "eps_below"], "gDDIM accepts eps below float64 resolution"),
    M("G1", "sampling", "cld_fast/samplers/gddim.py", "            usable = 0 if low[i] else usable + 1",
      "            usable = usable + 1", ["tests/test_gddim.py", "-k", "perturbed_score"],
      "gDDIM extrapolates through evaluations where a(t) is tiny"),
    M("G2", "ops", "cld_fast/opdefs.py", "    r = table.index_select(0, step.reshape(1)).to(f64)  # (1, GDDIM_COLS)",
      "    r = table.index_select(0, step.reshape(1)).to(u.dtype).to(f64)  # (1, GDDIM_COLS)",
      ["tests/test_gddim.py", "-k", "float32_runs and torch"], "gDDIM reference step with the row cast to float32"),
    M("G3", "inpainting", "cld_fast/opdefs.py", "    rx, rv = c[0] * xo, c[1] * xo\n",
      "    rx, rv = c[0] * xo, c[0] * xo\n", ["tests/test_conditions.py"],
      "inpainting replacement with the wrong mean of v"),
    M("G4", "guidance", "cld_fast/samplers/core.py", "        return torch.add(cond, cond - uncond, alpha=weight)",
      "        return torch.add(cond, uncond - cond, alpha=weight)", ["tests/test_guidance.py"],
      "classifier-free guidance extrapolates away from the condition"),
    M("G5", "guidance", "cld_fast/opdefs.py", "    return y + guide_weight * (y - y_uncond.to(dtype))",
      "    return y + guide_weight * (y_uncond.to(dtype) - y)",
      ["tests/test_ops_contract.py", "-k", "guided and torch"],
      "the fused classifier-free combination in the step ops' reference with the wrong sign"),
    # ---- nothing lost, nothing silently wrong: run folders, files, errors ------------------------------
    M("L1", "run lock", "cld_fast/runlock.py",
      'fd = os.open(self.run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))',
      'os.makedirs(self.run_dir, exist_ok=True); fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)',
      [LOCK, "-k", "deleted_or_replaced"], "lock taken on the .lock file: deleting it lets a second trainer in"),
    M("L2", "run lock", "cld_fast/runlock.py", '            atomic_write_text(self.path, f"{os.getpid()}\\n")\n',
      '            open(self.path, "w").write(f"{os.getpid()}\\n")\n',
      [LOCK, "-k", "symlink_at_the_lock"], "PID file written through a symlink planted at .lock"),
    M("L3", "run lock", "cld_fast/runlock.py", "        if not same:\n            raise RunFolderGoneError",
      "        if False:\n            raise RunFolderGoneError", [LOCK, "-k", "removed_or_swapped or deleted_mid_run"],
      "a deleted or swapped run folder is re-created and trained into"),
    M("L4", "train", "cld_fast/train.py",
      "            if self._finishing is not None:  # final evaluation", "            if False:  # final evaluation",
      [LOCK, "-k", "sigterm_during_the_final and evaluation"], "SIGTERM ignored during the final evaluation"),
    M("A1", "cli", "cld_fast/cli.py", "    with atomic_writer(npz) as f:\n        np.savez(f, **arrays)\n",
      "    np.savez(npz, **arrays)\n", [CLI, "-k", "full_disk"], "sample's .npz written in place (not atomic)"),
    M("A2", "cli", "cld_fast/fileio.py", "    p = os.path.realpath(p)\n", "",
      [CLI, "-k", "mount_of"], "disk-full error names the mount of the link's folder, not of the full disk"),
    M("A3", "cli", "cld_fast/cli.py", '    _prepare_out_dir(out_dir, "--out" if args.out else "the samples folder")\n', "",
      [CLI, "-k", "unwritable"], "sample finds a read-only output folder only after sampling"),
    M("A4", "cli", "cld_fast/config.py",
      "need(isinstance(self.eval_samples, int) and self.eval_samples >= 2,",
      "need(isinstance(self.eval_samples, int) and self.eval_samples >= 0,",
      [CLI, "-k", "one_line_before_training"], "--eval-samples 0/1 fails only after training"),
    M("D1", "data", "cld_fast/data.py", "    full = _WIDE_MODES.get(im.mode)\n", "    full = None\n",
      [DATA, "-k", "16_bit"], "16-bit PNGs clipped to 255"),
    M("D2", "data", "cld_fast/data.py", "    why = _not_regular(fn)\n    if why:\n        return why\n", "",
      [DATA, "-k", "fifo"], "a FIFO in an image folder is opened (blocks)"),
    M("D3", "data", "cld_fast/data.py", "            raise DataError(_worker_message(exc)) from None", "            raise",
      [DATA, "-k", "vanishing"], "a DataLoader worker's traceback folded into the error line"),
    M("C1", "checkpoint", "cld_fast/checkpoint.py", "not isinstance(step, int) or step < 0:",
      "not isinstance(step, int) or step < -10:", ["tests/test_checkpoint.py", "-k", "step_that"],
      "a checkpoint with step -5 resumes"),
    M("C2", "checkpoint", "cld_fast/checkpoint.py", "    for p in reversed(found):\n        if _loads_finite(p):",
      "    for p in found:\n        if _loads_finite(p):", ["tests/test_checkpoint.py", "-k", "nan_hint"],
      "NaN hint names the oldest finite checkpoint"),
    M("C3", "checkpoint", "cld_fast/checkpoint.py",
      "        if m and os.path.isfile(os.path.join(directory, name)):", "        if m:",
      ["tests/test_checkpoint.py", "-k", "folder_named"], "a folder named ckpt_*.pt taken for the newest checkpoint"),
    M("R1", "train", "cld_fast/train.py", "            self._set_aside_newer_checkpoints(path)\n", "            pass\n",
      [RESUME_OLDER, "-k", "older_checkpoint"], "resume from an older checkpoint leaves a stale newest checkpoint"),
    M("R2", "train", "cld_fast/train.py", "        self._check_resume_fits(state, path)\n", "",
      [RESUME_OLDER, "-k", "architecture"], "resume with another --sde/--model-opt fails as an internal error"),
    M("N1", "models", "models/layers.py", "num_groups=min(channels // 4, 32)", "num_groups=min(channels // 4, 16)",
      [NCSNPP, "-k", "group_norm"], "GroupNorm capped at 16 groups"),
    M("N2", "models", "models/ncsnpp.py", "embedding_size=nf, scale=cfg.fourier_scale)", "embedding_size=nf, scale=1.0)",
      [NCSNPP, "-k", "fourier_scale"], "NCSN++ ignores fourier_scale"),
    M("N3", "models", "models/ncsnpp.py",
      "Downsample = functools.partial(layers.Downsample, with_conv=cfg.resamp_with_conv,",
      "Downsample = functools.partial(layers.Downsample, with_conv=True,",
      [NCSNPP, "-k", "downsampling_without_conv"], "DDPM down-sampling ignores resamp_with_conv=False"),
    M("H1", "train", "cld_fast/train.py", "self._f = _open_append_no_follow(path) if path else None",
      'self._f = open(path, "a", buffering=1) if path else None', [TRAIN, "-k", "symlink"],
      "metrics.jsonl appended through a planted symlink"),
    M("H2", "checkpoint", "cld_fast/checkpoint.py", "    if not os.path.isfile(path):  # a FIFO or device",
      "    if False:  # a FIFO or device", ["tests/test_checkpoint.py", "-k", "fifo"],
      "--resume of a FIFO blocks forever"),
    M("H3", "train", "cld_fast/train.py", '        if int(state["step"]) > self.config.steps:',
      "        if False:", [TRAIN, "-k", "steps_below"], "--steps below the resumed step silently trains nothing"),
    M("H4", "train", "cld_fast/train.py", "                _remove_empty_run_folder(self.run_dir)\n",
      "                pass\n", [TRAIN, "-k", "failed_setup"], "a failed setup leaves empty run folders behind"),
    M("H5", "cli", "cld_fast/cli.py", '        raise _out_of_memory(exc, flag="--n", value=n, device=device) or exc',
      "        raise exc", [CLI, "-k", "sample_count_beyond"], "sample --n beyond memory is an internal error"),
    M("H6", "train", "cld_fast/train.py",
      "                raise OSError(exc.errno, exc.strerror or str(exc), self.path) from None",
      "                raise", [TRAIN, "-k", "metrics_write"], "a full disk while logging names no file (nor its disk)"),
    M("H7", "loading", "cld_fast/loading.py", 'return ckpt.resolve_resume(path, path, what="checkpoint folder")',
      "return ckpt.resolve_resume(path, path)", [CLI, "-k", "without_checkpoints"],
      "sample of a folder without checkpoints blames the train-only --resume"),
    M("H8", "cli", "cld_fast/cli.py", "        if os.path.isdir(args.out):\n            raise ValueError(f\"--out {args.out} is a folder",
      "        if False:\n            raise ValueError(f\"--out {args.out} is a folder", [CLI, "-k", "selftest_out"],
      "selftest --out naming a folder fails only after every check ran"),
]


def _copy_repo(dst: str) -> None:
    ignore = shutil.ignore_patterns(".git", "build", "__pycache__", "*.egg-info", ".pytest_cache", "runs", "*.o")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    # The editable install maps cld_fast.models / cld_fast.triton_kernels to the installed checkout;
    # links inside the copy's package make Python import the copy's (mutated) sources instead.
    for name in ("models", "triton_kernels"):
        link = os.path.join(dst, "cld_fast", name)
        if not os.path.exists(link):
            os.symlink(os.path.join("..", name), link)


def _env(work: str, extra: dict) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": work, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra)
    return env


def _check_copy_is_used(work: str) -> None:
    code = ("import cld_fast, cld_fast.models, cld_fast.triton_kernels, cld_fast.opdefs as o;"
            "print(cld_fast.__file__); print(cld_fast.models.__file__); print(cld_fast.triton_kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=_env(work, {}), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode != 0 or len(paths) != 3 or not all(os.path.realpath(p).startswith(os.path.realpath(work)) for p in paths):
        raise SystemExit(f"the temporary copy is not what Python imports: {out.stdout} {out.stderr[-2000:]}")


def _build(work: str) -> subprocess.CompletedProcess:
    env = _env(work, {"MAX_JOBS": os.environ.get("MAX_JOBS", "2")})
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                          capture_output=True, text=True)


def run_mutant(m: Mutant, work: str, timeout: float) -> dict:
    path = os.path.join(work, m.file)
    with open(path) as f:
        original = f.read()
    count = original.count(m.old)
    if count != 1:
        return {"result": "STALE", "detail": f"old text found {count} times", "seconds": 0.0}
    libs = {p: open(p, "rb").read() for p in glob.glob(os.path.join(work, "cld_fast", "_C*.so"))} if m.rebuild else {}
    t0 = time.time()
    try:
        with open(path, "w") as f:
            f.write(original.replace(m.old, m.new))
        if m.rebuild:
            b = _build(work)
            if b.returncode != 0:
                return {"result": "BUILD-FAILED", "detail": (b.stdout + b.stderr)[-300:], "seconds": time.time() - t0}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
        try:
            p = subprocess.run(cmd, cwd=work, env=_env(work, m.env), capture_output=True, text=True, timeout=timeout)
            rc, tail = p.returncode, (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        except subprocess.TimeoutExpired:
            rc, tail = -1, ["timeout"]
        if rc == 0:
            result = "SURVIVED"
        elif rc == 5:
            result = "NO-TESTS"
        elif rc == -1:
            result = "TIMEOUT"
        else:
            result = "KILLED"
        return {"result": result, "detail": tail[0][:160], "seconds": time.time() - t0}
    finally:
        with open(path, "w") as f:
            f.write(original)
        for lib, data in libs.items():
            with open(lib, "wb") as f:
                f.write(data)


def _row(m: Mutant, r: dict) -> str:
    tests = " ".join(m.tests).replace("|", "\\|")
    return f"| {m.id} | {m.area} | {m.why} | `{m.file}` | `{tests}` | {r['result']} | {r['seconds']:.0f} |"


def _previous_rows(path: str) -> dict:
    """id -> table line of an earlier results file (so a partial run, e.g. --only, updates its rows)."""
    rows = {}
    if path and os.path.exists(path):
        for line in open(path).read().splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) > 2 and any(cells[1] == m.id for m in MUTANTS):
                rows[cells[1]] = line
    return rows


def _table(lines) -> str:
    return "\n".join(["| id | area | mutant | file | tests | result | s |", "|---|---|---|---|---|---|---|", *lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--no-cpp", action="store_true", help="skip the mutants that rebuild the C++ extension")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run")
    ap.add_argument("--out", default=DEFAULT_OUT, help="Markdown file for the kill table")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if (not args.only or m.id in args.only) and not (args.no_cpp and m.rebuild)]
    if args.list:
        for m in chosen:
            print(f"{m.id:5s} {m.area:14s} {m.file:34s} {m.why}")
        return 0
    if not glob.glob(os.path.join(ROOT, "cld_fast", "_C*.so")):
        print("warning: no built cld_fast/_C*.so in the repository; cpu-backend tests will skip", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cld_mutants_") as tmp:
        work = os.path.join(tmp, "repo")
        _copy_repo(work)
        _check_copy_is_used(work)
        for m in chosen:
            r = run_mutant(m, work, args.timeout)
            rows.append((m, r))
            print(f"{m.id:5s} {r['result']:12s} {r['seconds']:6.0f}s  {m.why}  [{r['detail']}]", flush=True)
    killed = sum(r["result"] == "KILLED" for _, r in rows)
    print(f"{killed} of {len(rows)} mutants killed in this run")
    if args.out:
        lines = _previous_rows(args.out) if args.only or args.no_cpp else {}
        lines.update({m.id: _row(m, r) for m, r in rows})
        ordered = [lines[m.id] for m in MUTANTS if m.id in lines]
        total = sum(" KILLED " in line for line in ordered)
        text = ("# Mutation check (tools/mutation_check.py)\n\n"
                f"{total} of {len(ordered)} mutants killed. Each mutant is planted alone in a temporary copy of the "
                "repository and its tests run with `pytest -x`; KILLED means the tests failed, as they must. "
                "s: seconds for that mutant (for a C++ mutant, including the rebuild of the extension with it).\n\n" + _table(ordered) + "\n")
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
