"""Training metrics: TensorBoard scalars (optional extra) next to metrics.jsonl, the upscaled image grid,
and the quality plot's handling of values a log axis can't show."""
import json
import sys

import numpy as np
import pytest
import torch

from cld_fast import plots
from cld_fast.config import get_preset
from cld_fast.train import TENSORBOARD_HINT, _MetricsWriter, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(**kw):
    base = dict(steps=3, batch_size=32, precision="fp32", log_every=1, ckpt_every=0, quality_figure=False,
                eval_samples=32, eval_steps=3, sample_count=32, sample_steps=3)
    base.update(kw)
    return get_preset("toy", **base)


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(_toy(tensorboard=True), str(run), progress=False, verbose=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "samples_per_s", "eval/energy_distance"} <= tags
    assert "step" not in tags and "eval/method" not in tags
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in logged], rtol=1e-6)  # stored as float32
    (ed,) = acc.Scalars("eval/energy_distance")
    assert ed.step == 3 and ed.value == pytest.approx(records[-1]["eval"]["energy_distance"], rel=1e-6)


def test_no_tensorboard_files_unless_asked(tmp_path):
    run = tmp_path / "run"
    train(_toy(steps=1), str(run), progress=False, verbose=False)
    assert (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()


def test_missing_tensorboard_fails_before_training_with_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"cld_fast\[tensorboard\]"):
        train(_toy(tensorboard=True), str(tmp_path / "run"), progress=False, verbose=False)
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    assert "cld_fast[tensorboard]" in TENSORBOARD_HINT


def test_metrics_writer_logs_only_finite_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = _MetricsWriter(str(tmp_path / "m.jsonl"), str(tmp_path / "tb"))
    w.write({"step": 5, "loss": 0.5, "flag": True, "name": "x", "bad": float("nan"), "eval": {"ed": 0.25, "m": "sscs"}})
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/ed", "loss"]
    assert acc.Scalars("eval/ed")[0].step == 5 and acc.Scalars("eval/ed")[0].value == 0.25
    assert json.loads((tmp_path / "m.jsonl").read_text())["name"] == "x"


def test_cli_tensorboard_flag():
    from cld_fast.cli import _overrides, build_parser

    parser = build_parser()
    assert _overrides(parser.parse_args(["train", "--tensorboard"]))["tensorboard"] is True
    assert "tensorboard" not in _overrides(parser.parse_args(["train"]))


# ---- image grid ---------------------------------------------------------------------------------------


def test_grid_of_16x16_images_is_upscaled_by_nearest_neighbour(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    small = plots.grid_array(images, scale=1)
    assert plots.grid_scale(16, 16) == 4 and plots.grid_scale(32, 32) == 2 and plots.grid_scale(64, 48) == 1
    big = plots.grid_array(images)
    assert big.shape == (small.shape[0] * 4, small.shape[1] * 4, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(big, np.kron(small, np.ones((4, 4, 1), dtype=np.uint8)))
    # the first image's top-left pixel, by hand: pad 2, then (x + 1) / 2 * 255 rounded
    expect = np.floor((images[0, :, 0, 0].clamp(-1, 1).numpy() + 1) * 0.5 * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(big[8:12, 8:12].reshape(-1, 3), np.tile(expect, (16, 1)))
    path = plots.image_grid(images, str(tmp_path / "grid.png"))
    import matplotlib.pyplot as plt

    png = plt.imread(path)
    assert png.shape[:2] == big.shape[:2]
    assert plots.grid_array(torch.zeros(2, 1, 64, 64)).shape == plots.grid_array(torch.zeros(2, 1, 64, 64), scale=1).shape
    with pytest.raises(ValueError, match="scale"):
        plots.grid_array(images, scale=0)


# ---- quality plot ------------------------------------------------------------------------------------


def test_log_floor_note_names_the_clamped_values():
    assert plots.log_floor_note([0.01, 2e-6]) == ""
    note = plots.log_floor_note([0.01, -1e-4, 0.0])
    assert note.startswith("2 value(s) <= 1e-06") and "-0.0001" in note and "drawn at 1e-06" in note


def test_quality_figure_labels_clamped_values(tmp_path, monkeypatch):
    texts = []

    def capture(fig, path):
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return path

    monkeypatch.setattr(plots, "_save", capture)
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(50, 2, generator=g)
    plots.quality_figure(str(tmp_path / "q.png"), pts, pts, {"sscs": [(10, 0.01), (100, -1e-4)]}, floor=-2e-4)
    assert any("drawn at 1e-06" in t and "-0.0001" in t for t in texts), texts
    texts.clear()
    plots.quality_figure(str(tmp_path / "q.png"), pts, pts, {"sscs": [(10, 0.01), (100, 1e-3)]}, floor=1e-4)
    assert not any("drawn at" in t for t in texts), texts
