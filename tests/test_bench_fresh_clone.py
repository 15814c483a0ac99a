"""bench/fresh_clone_report.py: the fresh-clone results file from a run folder of `cld-fast train`."""
import json
import subprocess

import pytest

from bench import fresh_clone_report


def _metrics(fd):
    clf = {"confident": 0.7, "mean_top_prob": 0.9, "histogram": [0.1] * 10, "min_class": 0.1}
    mem = {"median_nn_samples": 11.0, "median_nn_heldout": 10.0, "ratio": 1.1, "copies": 0.0}
    return {"fd": fd, "classifier": clf, "memorisation": mem}


def _fake_clone(tmp_path, with_eval=True):
    clone = tmp_path / "clone"
    run = clone / "runs" / "mnist5k-20261206-120000"
    (run / "samples").mkdir(parents=True)
    (clone / "cld_fast").mkdir()
    (clone / "cld_fast" / "_build_info.json").write_text(json.dumps({"cpu_built": True, "cuda_built": True}))
    (run / "config.json").write_text(json.dumps({"data": "mnist5k", "batch_size": 64, "precision": "auto"}))
    records = [{"step": 50, "loss": 70.0, "time": 30.0}, {"step": 100, "loss": 50.0, "time": 60.0}]
    if with_eval:
        ev = {"method": "sscs", "steps": 100, "n": 1000, "n_heldout": 1000, "sample_seconds": 120.0,
              **_metrics(35.5), "floor": _metrics(26.5)}
        records.append({"step": 100, "eval": ev})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "sampler_table.md").write_text("# Samplers\n\nStep 100, floor 26.50.\n\n| sampler | 10 steps |\n"
                                          "| :--- | ---: |\n| sscs | 80.00 (0.40) |\n")
    (run / "samples" / "samples_final.png").write_bytes(b"\x89PNG fake")
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    logs = tmp_path / "train.log"
    logs.write_text("[cld-fast] run dir somewhere\ntrain cld:  50%|#    | 1/2\rtrain cld: 100%|##| 2/2\n"
                    "trained 2 steps\n")
    load = tmp_path / "load.log"
    load.write_text(" 12:00:00 up 1:00, 0 user, load average: 2.10, 2.0, 1.9\n"
                    " 12:01:00 up 1:01, 0 user, load average: 2.30, 2.0, 1.9\n")
    return clone, logs, load


def _argv(clone, logs, load, out):
    return ["--clone", str(clone), "--train-log", str(logs), "--load-log", str(load), "--install-seconds", "150",
            "--train-seconds", "300", "--out", str(out)]


def test_report_states_times_metrics_floor_and_sampler_table(tmp_path):
    clone, logs, load = _fake_clone(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert fresh_clone_report.main(_argv(clone, logs, load, out)) == 0
    md = (out / "mnist5k-fresh-clone-cpu.md").read_text()
    assert "**7.5 min**" in md  # 150 s install + 300 s train command
    assert "1.0 min (0.60 s per step)" in md  # the training loop's 60 s over 100 steps
    assert "2.0 min" in md  # sampling; the remaining 120 s are metrics and the table
    assert "| samples | 35.500 |" in md and "| floor (data vs held-out) | 26.500 |" in md
    assert "| sscs | 80.00 (0.40) |" in md
    assert "2.10 to 2.30" in md
    assert "[cld-fast] run dir somewhere" in md and "trained 2 steps" in md and "train cld" not in md
    assert (out / "mnist5k-fresh-clone-samples.png").read_bytes() == b"\x89PNG fake"
    data = json.loads((out / "mnist5k-fresh-clone-cpu.json").read_text())
    assert data["train_loop_s"] == 60.0 and data["eval"]["fd"] == 35.5


def test_report_refuses_a_run_without_its_evaluation(tmp_path):
    clone, logs, load = _fake_clone(tmp_path, with_eval=False)
    with pytest.raises(SystemExit, match="no evaluation"):
        fresh_clone_report.main(_argv(clone, logs, load, tmp_path))
