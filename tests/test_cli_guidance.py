"""cld-fast sample --class / --guidance / --classifier: classifier-free and classifier guidance from the
command line, and their user errors (one line on stderr, exit status 2)."""
import os

import numpy as np
import pytest
import torch

import cld_fast as cf
from cld_fast.config import get_preset
from cld_fast.noise_classifier import NoiseClassifier, NoiseClassifierMLP, save_classifier
from cld_fast.train import train
from cli_helpers import cli, one_line_error, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step conditional digits run, a 4-step toy run and classifiers for each."""
    root = tmp_path_factory.mktemp("guided")
    cond = str(root / "cond")
    train(get_preset("digits", conditional=True, steps=4, batch_size=16, log_every=2, ckpt_every=0, precision="fp32",
                     eval_samples=16, eval_steps=2, sample_steps=2, sample_count=4, model_overrides={"n_channels": 8}),
          cond, progress=False, verbose=False)
    toy = str(root / "toy")
    train(toy_config(), toy, progress=False, verbose=False)
    torch.manual_seed(0)
    digits_cls, toy_cls, other_cls = str(root / "digits.pt"), str(root / "toy.pt"), str(root / "other.pt")
    save_classifier(NoiseClassifier(1, 10, 16, 8), digits_cls, cf.load_score_model(cond).sde)
    save_classifier(NoiseClassifierMLP(2, 8, 16), toy_cls, cf.load_score_model(toy).sde)
    save_classifier(NoiseClassifierMLP(2, 8, 16), other_cls, cf.CLD(beta0=2.0))
    return dict(cond=cond, toy=toy, digits_cls=digits_cls, toy_cls=toy_cls, other_cls=other_cls, root=root)


def _x(out, name):
    return np.load(os.path.join(out, name + ".npz"))["x"]


def test_classifier_free_from_the_command_line(runs, capsys):
    out = str(runs["root"] / "s1")
    args = ("sample", runs["cond"], "--class", "3", "--guidance", "2.0", "--n", "4", "--steps", "3", "--out", out)
    rc, text, err = cli(capsys, *args)
    assert rc == 0, err
    first = _x(out, "samples_sscs_3_class3_cfg2")
    assert first.shape == (4, 1, 8, 8) and np.isfinite(first).all()
    rc, _, err = cli(capsys, *args, "--name", "again")
    assert rc == 0 and np.array_equal(_x(out, "again"), first)  # same seed, same samples
    # the command line runs what the API runs
    m = cf.load_score_model(runs["cond"])
    res = cf.sample(m.score_fn, (4, 1, 8, 8), m.sde, steps=3, generator=torch.Generator().manual_seed(0),
                    guidance=cf.ClassifierFree(3, 2.0))
    np.testing.assert_allclose(first, res.x.numpy(), rtol=1e-5, atol=1e-5)


def test_classifier_guidance_from_the_command_line(runs, capsys):
    out = str(runs["root"] / "s2")
    for run, clf in ((runs["toy"], runs["toy_cls"]), (runs["cond"], runs["digits_cls"])):
        rc, _, err = cli(capsys, "sample", run, "--class", "1", "--classifier", clf, "--n", "6", "--steps", "3",
                         "--out", out, "--name", os.path.basename(run))
        assert rc == 0, err
        assert np.isfinite(_x(out, os.path.basename(run))).all()


def test_guidance_user_errors_are_one_line(runs, capsys):
    out = str(runs["root"] / "bad")
    base = ("--n", "2", "--steps", "2", "--out", out)
    cases = [
        ((runs["toy"], "--class", "1"), ["--class", "not class-conditional", "--classifier"]),
        ((runs["cond"], "--class", "10"), ["--class must be in [0, 10)"]),
        ((runs["cond"], "--class", "-1"), ["--class must be in [0, 10)"]),
        ((runs["toy"], "--class", "8", "--classifier", runs["toy_cls"]), ["--class must be in [0, 8)", "classifier"]),
        ((runs["cond"], "--class", "1", "--guidance", "-1"), ["--guidance must be a finite number >= 0"]),
        ((runs["cond"], "--guidance", "2"), ["need --class"]),
        ((runs["toy"], "--classifier", runs["toy_cls"]), ["need --class"]),
        ((runs["toy"], "--class", "1", "--classifier", str(runs["root"] / "missing.pt")), ["missing.pt"]),
        ((runs["toy"], "--class", "1", "--classifier", runs["other_cls"]), ["was trained for", "same CLD"]),
    ]
    for args, needles in cases:
        rc, _, err = cli(capsys, "sample", *args, *base)
        one_line_error(rc, err, *needles)
    assert not os.path.exists(out)


def test_train_conditional_user_errors_are_one_line(tmp_path, capsys):
    rc, _, err = cli(capsys, "train", "--conditional", "--steps", "2", "--out", str(tmp_path / "a"), "--no-progress")
    one_line_error(rc, err, "--conditional", "labelled data", "gmm")
    rc, _, err = cli(capsys, "train", "--data", "digits", "--conditional", "--label-dropout", "2", "--steps", "2",
                     "--out", str(tmp_path / "b"), "--no-progress")
    one_line_error(rc, err, "--label-dropout", "[0, 1]")
