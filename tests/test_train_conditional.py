"""Class-conditional training (``cld-fast train --conditional``): labels reach the network, label dropout,
checkpoint round trip, resume, loading a conditional score function, bad configs."""
import pytest
import torch

import cld_fast as cf
from cld_fast import checkpoint as ckpt
from cld_fast.config import get_preset
from cld_fast.train import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(**kw):
    base = dict(conditional=True, steps=4, batch_size=16, log_every=2, ckpt_every=2, keep_checkpoints=0,
                precision="fp32", eval_samples=16, eval_steps=2, sample_steps=2, sample_count=4,
                model_overrides={"n_channels": 8})
    base.update(kw)
    return get_preset("digits", **base)


def test_labels_of_the_batch_reach_the_network(tmp_path):
    from cld_fast.data import load_packaged

    tr = Trainer(_digits(label_dropout=0.0), str(tmp_path / "run"), progress=False, verbose=False)
    seen = []
    real = tr.net.forward
    tr.net.forward = lambda u, t, class_labels=None: seen.append(class_labels) or real(u, t, class_labels)
    tr.train_step()
    images, labels = load_packaged("digits", "train")
    idx = torch.tensor(tr.data.sampler.batch(0))
    assert torch.equal(seen[0], labels[idx])
    tr.close()


def test_label_dropout_fraction(tmp_path):
    tr = Trainer(_digits(label_dropout=0.25), str(tmp_path / "run"), progress=False, verbose=False)
    labels = torch.arange(20000) % 10
    out = tr.dropped_labels(labels)
    dropped = out == 10
    assert abs(dropped.double().mean().item() - 0.25) < 5 * (0.25 * 0.75 / 20000) ** 0.5
    assert torch.equal(out[~dropped], labels[~dropped])
    tr.config = tr.config.replace(label_dropout=0.0)
    assert torch.equal(tr.dropped_labels(labels), labels)
    tr.config = tr.config.replace(label_dropout=1.0)
    assert bool((tr.dropped_labels(labels) == 10).all())
    tr.close()


def test_conditional_checkpoint_round_trip_resume_and_loading(tmp_path):
    full = train(_digits(), str(tmp_path / "full"), progress=False, verbose=False)
    part_dir = str(tmp_path / "part")
    train(_digits(steps=2), part_dir, progress=False, verbose=False)
    resumed = train(_digits(), part_dir, resume="latest", progress=False, verbose=False)
    a = torch.load(full.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert a["config"]["conditional"] is True and a["config"]["label_dropout"] == 0.1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    m = cf.load_score_model(full.checkpoint)
    assert m.network.num_classes == 10 and m.score_fn.num_classes == 10
    res = cf.sample(m.score_fn, (4, 1, 8, 8), m.sde, steps=3, generator=torch.Generator().manual_seed(0),
                    guidance=cf.ClassifierFree([0, 1, 2, 3], 1.0))
    assert res.x.shape == (4, 1, 8, 8) and torch.isfinite(res.x).all()
    with pytest.raises(ckpt.CheckpointError, match="--conditional cannot change"):
        train(_digits(steps=6, conditional=False), part_dir, resume="latest", progress=False, verbose=False)


def test_same_seed_same_conditional_weights(tmp_path):
    a = Trainer(_digits(), str(tmp_path / "a"), progress=False, verbose=False)
    b = Trainer(_digits(), str(tmp_path / "b"), progress=False, verbose=False)
    for _ in range(2):
        a.train_step()
        b.train_step()
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(p, q)
    assert a.net.label_embedding.weight.abs().sum() > 0  # the embedding trains
    a.close()
    b.close()


def test_bad_conditional_configs():
    with pytest.raises(ValueError, match=r"conditional \(--conditional\) training needs labelled data"):
        get_preset("toy", conditional=True)
    with pytest.raises(ValueError, match=r"label_dropout \(--label-dropout\) must be a number in \[0, 1\]"):
        get_preset("digits", conditional=True, label_dropout=1.5)
