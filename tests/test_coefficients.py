"""In-kernel coefficients (C++/CUDA header and Triton jit functions) against ``cld_fast/sde.py``.

Every compiled kernel computes its per-row coefficients itself from t and the CLD parameters. Each
language exposes a probe that evaluates those exact functions for a vector of times; here they are
compared with the float64 reference of ``cld_fast.sde`` over this parameter grid:
t from 1e-5 to 1, m_inv in {1, 4, 9, 25}, gamma in {0.01, 0.04, 0.1}, beta1 in {0, 6},
numerical_eps in {0, 1e-9, 1e-6}. Tolerance: 1e-12 relative (measured: a few ulp).
"""
import itertools

import pytest
import torch

import cld_fast as cf
from cld_fast import philox, sde as sde_mod
from cld_fast._extension import compiled_parts, load_extension
from cld_fast.sde import CLD

PARAM_GRID = list(itertools.product([0.0, 6.0], [1.0, 4.0, 9.0, 25.0], [0.01, 0.04, 0.1], [0.0, 1e-9, 1e-6]))
T = torch.logspace(-5, 0, 23, dtype=torch.float64)
H = 0.5 * T  # t - h stays in (0, 1)
RTOL = 1e-12


def _cpp_probe():
    if "cpu" not in compiled_parts():
        pytest.skip("cld_fast._C (the C++ kernels) is not built")
    return load_extension()[0]._coefficients_probe


def _triton_probe():
    if "triton" not in cf.backends():
        pytest.skip("triton backend not available (set TRITON_INTERPRET=1 on a CPU machine)")
    from cld_fast.triton_kernels import coefficients

    return coefficients.probe


PROBES = {"cpp": _cpp_probe, "triton": _triton_probe}


def _reference(sde: CLD, kind: str, code: int, mixed: bool, objective: int = 0, output: int = 0) -> torch.Tensor:
    if kind == "perturb":
        k = sde.perturbation_kernel(T, sde_mod.OBJECTIVES[code])
        return torch.stack([k.a_xx, k.a_xv, k.a_vx, k.a_vv, k.s_xx, k.s_xv, k.s_vv, k.l11, k.l21, k.l22], -1)
    if kind == "loss":
        return sde.loss_coefficients(T, sde_mod.WEIGHTINGS[code], sde_mod.OBJECTIVES[objective],
                                     sde_mod.OUTPUTS[output])
    if kind == "mixed":
        return sde.score_coefficients(T, sde_mod.OBJECTIVES[objective], sde_mod.OUTPUTS[output])
    if kind == "half_step":
        return sde.half_step_coefficients(T, H)
    mix = sde.mixed_score_coefficients(T) if mixed else None
    if kind == "score_step":
        return sde.score_step_coefficients(T, H, mixed=mix)
    return sde.reverse_affine_coefficients(T, H, sde_mod.AFFINE_KINDS[code], mixed=mix)


MODES = [(obj, out) for obj in (0, 1) for out in (0, 1, 2)]  # (objective, output) codes
CASES = ([("perturb", c, False, 0, 0) for c in (0, 1)]
         + [("loss", c, False, 0, 0) for c in (0, 1, 2)] + [("loss", 1, False, o, p) for o, p in MODES[1:]]
         + [("loss", 2, False, 1, 0)] + [("mixed", 0, False, o, p) for o, p in MODES]
         + [("half_step", 0, False, 0, 0)] + [("score_step", 0, m, 0, 0) for m in (False, True)]
         + [("affine", c, m, 0, 0) for c in (0, 1, 2) for m in (False, True)])


@pytest.mark.parametrize("language", sorted(PROBES))
@pytest.mark.parametrize("kind, code, mixed, objective, output", CASES)
def test_probe_matches_sde_reference_float64(language, kind, code, mixed, objective, output):
    probe = PROBES[language]()
    worst = 0.0
    for beta1, m_inv, gamma, neps in PARAM_GRID:
        sde = CLD(beta0=4.0, beta1=beta1, m_inv=m_inv, gamma=gamma, numerical_eps=neps)
        params = [getattr(sde, name) for name in sde_mod.PARAMS]
        got = probe(kind, T, H, params, code, mixed, objective, output)
        want = _reference(sde, kind, code, mixed, objective, output)
        assert got.shape == want.shape and got.dtype == torch.float64
        err = (got - want).abs() / want.abs().clamp(min=1e-300)
        err = torch.where(want == 0, (got - want).abs(), err)
        worst = max(worst, float(err.max()))
        assert float(err.max()) <= RTOL, (
            f"{language} {kind} code={code} mixed={mixed} objective={objective} output={output} beta1={beta1} "
            f"m_inv={m_inv} gamma={gamma} "
            f"numerical_eps={neps}: relative error {float(err.max()):.3g} (column "
            f"{int(err.max(0).values.argmax())})")


@pytest.mark.parametrize("language", sorted(PROBES))
def test_layouts_agree_across_languages(language):
    """Parameter order, enum codes and Philox tags are named once per language and agree."""
    if language == "cpp":
        _cpp_probe()
        layout = load_extension()[0]._layout()
    else:
        _triton_probe()
        from cld_fast.triton_kernels import coefficients

        layout = coefficients.LAYOUT
    assert list(layout["params"]) == list(sde_mod.PARAMS)
    assert dict(layout["objective"]) == sde_mod.OBJECTIVE_CODES
    assert dict(layout["weighting"]) == sde_mod.WEIGHTING_CODES
    assert dict(layout["output"]) == sde_mod.OUTPUT_CODES
    assert dict(layout["kind"]) == sde_mod.AFFINE_KIND_CODES
    tags = {"perturb": philox.TAG_PERTURB, "half_step": philox.TAG_HALF_STEP, "sscs": philox.TAG_SSCS,
            "affine": philox.TAG_AFFINE, "inpaint": philox.TAG_INPAINT}
    assert dict(layout["philox_tags"]) == tags


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("params", [dict(), dict(beta1=6.0, m_inv=25.0, gamma=0.01, numerical_eps=1e-6),
                                    dict(m_inv=1.0, gamma=0.1, numerical_eps=0.0)])
def test_float32_kernel_outputs_within_1e6_of_float64(backend, params):
    """A float32 perturb with unit inputs returns A and L themselves: within 1e-6 of sde.py."""
    if backend not in cf.backends():
        pytest.skip(f"{backend} backend not available")
    sde = CLD(**params)
    t = T.float()
    b = t.numel()
    ones = torch.ones(b, 1)
    zeros = torch.zeros(b, 2, 1)
    k = sde.perturbation_kernel(t.double())
    mean, _ = cf.perturb(ones, t, sde, eps=zeros, backend=backend)          # (a_xx, a_vx)
    unit_x, _ = cf.perturb(0 * ones, t, sde, eps=torch.cat([ones, 0 * ones], 1).view(b, 2, 1), backend=backend)
    unit_v, _ = cf.perturb(0 * ones, t, sde, eps=torch.cat([0 * ones, ones], 1).view(b, 2, 1), backend=backend)
    got = torch.stack([mean[:, 0], mean[:, 1], unit_x[:, 0], unit_x[:, 1], unit_v[:, 1]], -1).double()
    want = torch.stack([k.a_xx, k.a_vx, k.l11, k.l21, k.l22], -1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
