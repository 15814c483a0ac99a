"""Multi-process training on CPU with the gloo backend (DDP), as torchrun would run it."""
import json
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from cld_fast import checkpoint as ckpt
from cld_fast import distributed as dist_utils


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from cld_fast.config import get_preset
    from cld_fast.train import Trainer

    cfg = get_preset("toy", data="gmm", steps=200, batch_size=128, lr=2e-3, precision="fp32", log_every=50,
                     ckpt_every=100, quality_figure=False, eval_samples=200, eval_steps=10, sample_count=200,
                     sample_steps=10, device="cpu")
    tr = Trainer(cfg, os.path.join(out_dir, "run"), progress=False, verbose=False)
    assert dist_utils.world_size() == world and dist_utils.rank() == rank
    state = tr.generator.get_state()
    first_batch = tr.data.next(0, tr.generator)  # what this rank trains on first
    tr.generator.set_state(state)
    before = tr.evaluate_loss(8192, seed=11)
    result = tr.run()
    after = tr.evaluate_loss(8192, seed=11)
    torch.save({"params": [p.detach().clone() for p in tr.net.parameters()],
                "ema": [s.clone() for s in tr.ema.shadow_params],
                "first_batch": first_batch, "before": before, "after": after,
                "checkpoint": result.checkpoint}, os.path.join(out_dir, f"rank{rank}.pt"))
    tr.close()


def test_two_process_gloo_ddp_identical_weights_and_loss_decreases(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)                   # DDP keeps the ranks bitwise in sync
    for a, b in zip(r0["ema"], r1["ema"]):
        assert torch.equal(a, b)
    assert not torch.equal(r0["first_batch"], r1["first_batch"])   # each rank draws its own data
    assert r0["after"] < r0["before"] - 0.003      # the loss on a fixed batch went down
    # only rank 0 wrote checkpoints and logs; the checkpoint holds both ranks' RNG states
    found = ckpt.list_checkpoints(str(tmp_path / "run" / "checkpoints"))
    assert [os.path.basename(p) for p in found] == ["ckpt_0000100.pt", "ckpt_0000200.pt"]
    state = ckpt.load_checkpoint(found[-1])
    assert state["world_size"] == 2 and len(state["rng"]["generator"]) == 2
    assert not torch.equal(state["rng"]["generator"][0], state["rng"]["generator"][1])
    for a, b in zip(state["model"].values(), r0["params"]):
        assert torch.equal(a, b)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == [50, 100, 150, 200]


def test_torchrun_cli_two_ranks(tmp_path):
    """The real launcher: torchrun --standalone --nproc_per_node 2 -m cld_fast.cli train ..."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "cld_fast.cli", "train", "--out", str(tmp_path / "run"), "--steps", "20", "--batch-size", "64",
           "--data", "gmm", "--log-every", "10", "--ckpt-every", "10", "--no-progress", "--eval-samples", "200",
           "--eval-steps", "10", "--no-quality-figure", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 20 steps") == 1          # only rank 0 reports
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path / "run" / "checkpoints")))
    assert state["step"] == 20 and state["world_size"] == 2
