import os
import random
import zlib

import numpy as np
import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Backstop: every test starts from global RNGs seeded from its own id (torch incl. CUDA, numpy,
    random), so a test that draws without a generator gives the same numbers whatever ran before it.
    Tests still seed what they draw themselves; this only removes the dependence on test order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    yield


@pytest.fixture
def gen():
    """A seeded CPU generator per test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Many small ops: one intra-op thread is fastest and immune to a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gm():
    """The 8-Gaussian mixture of the sampler acceptance tests (radius 0.7, std 0.08)."""
    from cld_fast.toy import GaussianMixture2D

    return GaussianMixture2D()


@pytest.fixture(scope="module")
def sde():
    """The default CLD (beta0 = 4, beta1 = 0, m_inv = 4, gamma = 0.04)."""
    import cld_fast as cf

    return cf.CLD()


@pytest.fixture
def toy_score_net():
    """Factory of a tiny model(u, t) -> out for 2-D data (u: (B, 4)): an MLP on cat(u, t), seeded."""

    def make(width=32, activation=torch.nn.SiLU):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, width), activation(), torch.nn.Linear(width, 2))

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, u, t):
                return self.net(torch.cat([u, t[:, None]], 1))

        return Model

    return make


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished toy run (``cli_helpers.toy_config``) with checkpoints at steps 2 and 4."""
    from cld_fast import checkpoint as ckpt
    from cld_fast.train import train
    from cli_helpers import toy_config

    out = str(tmp_path_factory.mktemp("run"))
    train(toy_config(), out, progress=False, verbose=False)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(os.path.join(out, "checkpoints"))] == [
        "ckpt_0000002.pt", "ckpt_0000004.pt"]
    return out
