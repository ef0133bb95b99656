"""Replay buffers: reservoir uniformity, class balance, capacity, compact storage, resumability."""

from __future__ import annotations

import torch

from cl.memory import ClassBalancedMemory, ReservoirMemory, balanced_quotas, create_memory


def test_reservoir_keeps_capacity_and_counts_stream():
    mem = ReservoirMemory(5, torch.Generator().manual_seed(0))
    mem.add(torch.arange(3).float()[:, None], torch.arange(3))
    assert len(mem) == 3 and mem.n_seen == 3
    assert torch.equal(mem.y, torch.tensor([0, 1, 2]))  # filling phase keeps everything, in order
    mem.add(torch.arange(3, 20).float()[:, None], torch.arange(3, 20))
    assert len(mem) == 5 and mem.n_seen == 20
    assert torch.equal(mem.x[:, 0].long(), mem.y)  # rows stay aligned
    assert len(set(mem.y.tolist())) == 5


def test_reservoir_is_a_uniform_sample_of_the_stream():
    """Each of N stream items must end up in memory with probability capacity / N.

    Over 4000 independent streams (fixed seed), the inclusion count of every item is compared
    with its binomial expectation; a chi-square statistic with N-1 degrees of freedom stays within
    a generous bound, and the first and last items are not favoured.
    """
    n, capacity, trials = 50, 10, 4000
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(n)
    for _ in range(trials):
        mem = ReservoirMemory(capacity, g)
        for start in range(0, n, 7):  # uneven batches, like a stream
            ids = torch.arange(start, min(start + 7, n))
            mem.add(ids.float()[:, None], ids)
        counts[mem.y] += 1
    expected = trials * capacity / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100, chi2  # 49 dof: mean 49, p(chi2 > 100) < 1e-4
    assert abs(counts[:10].mean() - expected) < 0.1 * expected
    assert abs(counts[-10:].mean() - expected) < 0.1 * expected


def test_reservoir_sample_is_distinct_and_seeded():
    def draw(seed: int) -> list[int]:
        mem = ReservoirMemory(20, torch.Generator().manual_seed(seed))
        mem.add(torch.zeros(50, 3, dtype=torch.uint8), torch.arange(50))
        return mem.sample(8)[1].tolist()

    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert len(set(draw(0))) == 8


def test_memory_stores_compact_inputs():
    mem = ReservoirMemory(4, torch.Generator().manual_seed(0))
    mem.add(torch.zeros(6, 1, 28, 28, dtype=torch.uint8), torch.arange(6))
    assert mem.x.dtype == torch.uint8
    assert mem.nbytes == 4 * (28 * 28 + 16)


def test_balanced_quotas_water_filling():
    assert balanced_quotas({0: 100, 1: 100, 2: 100}, 10) == {0: 4, 1: 3, 2: 3}
    assert balanced_quotas({0: 2, 1: 100, 2: 100}, 10) == {0: 2, 1: 4, 2: 4}
    assert balanced_quotas({0: 1, 1: 1}, 10) == {0: 1, 1: 1}
    assert sum(balanced_quotas({c: 7 for c in range(9)}, 20).values()) == 20


def test_class_balanced_memory_rebalances_after_each_experience():
    mem = ClassBalancedMemory(12, torch.Generator().manual_seed(0))
    x1, y1 = torch.arange(40).float()[:, None], torch.tensor([0, 1] * 20)
    mem.update(x1, y1, 0)
    assert mem.class_counts() == {0: 6, 1: 6}
    before = set(mem.x[:, 0].tolist())
    x2, y2 = torch.arange(100, 140).float()[:, None], torch.tensor([2, 3] * 20)
    mem.update(x2, y2, 1)
    assert mem.class_counts() == {0: 3, 1: 3, 2: 3, 3: 3}
    old = {v for v in mem.x[:, 0].tolist() if v < 100}
    assert old <= before  # old classes shrink to a subset of what was stored
    assert set(mem.t[mem.y >= 2].tolist()) == {1}


def test_state_dict_round_trip():
    for policy in ("reservoir", "class_balanced"):
        mem = create_memory(policy, 8, torch.Generator().manual_seed(0))
        x, y = torch.randn(30, 4), torch.arange(30) % 3
        (mem.add if policy == "reservoir" else mem.update)(x, y, 2)
        clone = create_memory(policy, 8, torch.Generator())
        clone.load_state_dict(mem.state_dict())
        assert torch.equal(clone.x, mem.x) and torch.equal(clone.y, mem.y) and torch.equal(clone.t, mem.t)
        if policy == "reservoir":
            assert clone.n_seen == 30


def test_zero_capacity_memory_stays_empty():
    mem = ReservoirMemory(0, torch.Generator())
    mem.add(torch.zeros(5, 2), torch.arange(5))
    assert len(mem) == 0 and mem.n_seen == 5 and mem.nbytes == 0
