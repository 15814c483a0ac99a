"""The noise contract (cld_fast.philox) against published Philox4x32-10 answers and its own statistics."""
import math

import torch

from cld_fast import philox


def _bits(c, k):
    t = [torch.tensor([v], dtype=torch.int64) for v in c + k]
    return [hex(int(x)) for x in philox.philox4x32(*t)]


def test_random123_known_answers():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    assert _bits([0, 0, 0, 0], [0, 0]) == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]
    f = 0xFFFFFFFF
    assert _bits([f, f, f, f], [f, f]) == ["0x408f276d", "0x41c83b0e", "0xa20bc7c6", "0x6d5451fd"]
    pi = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]
    assert _bits(pi, [0xA4093822, 0x299F31D0]) == ["0xd16cfe09", "0x94fdcceb", "0x5001e420", "0x24126ea1"]


def test_uniform_map_edges():
    r = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1], dtype=torch.int64)
    u = philox.uniform_from_bits(r)
    assert u.dtype == torch.float32
    assert u[0] == 0 and u[4] == 0  # 0xffffffff is int32 -1 -> ~(-1) = 0
    assert float(u.max()) <= 1.0
    assert u[2] == u[3]  # 2^31 - 1 and int32 min map to the same magnitude


def test_normals_moments_and_independence():
    z = philox.philox_normals(200_000, seed=987654321, step=3, tag=2).double()
    n = z.shape[1]
    se_mean = 1 / math.sqrt(n)
    for j in range(4):
        assert abs(z[j].mean().item()) < 5 * se_mean
        assert abs(z[j].var().item() - 1) < 5 * math.sqrt(2 / n)
        assert abs((z[j] ** 4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    corr = torch.corrcoef(z)
    off = corr - torch.eye(4, dtype=torch.float64)
    assert off.abs().max().item() < 5 * se_mean


def test_streams_differ_and_repeat():
    a = philox.philox_normals(1000, seed=5, step=0, tag=0)
    assert torch.equal(a, philox.philox_normals(1000, seed=5, step=0, tag=0))
    for other in (philox.philox_normals(1000, seed=6, step=0, tag=0), philox.philox_normals(1000, seed=5, step=1, tag=0),
                  philox.philox_normals(1000, seed=5, step=0, tag=1)):
        assert not torch.equal(a, other)


def test_seed_tensor_and_int_agree_and_high_word_counts():
    s = torch.tensor([2 ** 40 + 17], dtype=torch.int64)
    assert torch.equal(philox.philox_normals(64, s, torch.tensor([7])), philox.philox_normals(64, 2 ** 40 + 17, 7))
    # element indices above 2^32 land in counter word c1
    hi = philox.philox_bits(2, seed=1, start=2 ** 32)
    lo = philox.philox_bits(2, seed=1, start=0)
    assert not torch.equal(hi[0], lo[0])


def test_seed_from_generator_reproducible():
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a, b = philox.seed_from_generator(g1, "cpu"), philox.seed_from_generator(g2, "cpu")
    assert a.dtype == torch.int64 and a.shape == (1,)
    assert torch.equal(a, b)
    assert not torch.equal(a, philox.seed_from_generator(g1, "cpu"))
