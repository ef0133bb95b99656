"""RanPAC: the ridge solution, λ selection, and equivalence of incremental and joint accumulation."""

from __future__ import annotations

from pathlib import Path

import torch

from cl.config import parse_run_config
from cl.engine.loop import prepare
from strategies.ranpac import ridge_solve, select_ridge
from tests.conftest import tiny_config


def test_ridge_solve_by_hand():
    G = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    C = torch.tensor([[2.0], [8.0]], dtype=torch.float64)
    # (G + 2I)^-1 C = [2/4, 8/6]
    torch.testing.assert_close(ridge_solve(G, C, 2.0), torch.tensor([[0.5], [8 / 6]], dtype=torch.float64))


def test_select_ridge_prefers_little_regularisation_for_clean_linear_data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = h @ torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert select_ridge(h, y, [1e-6, 1e2, 1e6], 0.2, torch.Generator().manual_seed(1)) == 1e-6
    noise = torch.randn(200, 3, generator=g, dtype=torch.float64)  # targets unrelated to h: shrink to zero
    assert select_ridge(h, noise, [1e-6, 1e6], 0.2, torch.Generator().manual_seed(1)) == 1e6


def test_accumulated_statistics_equal_one_batch_and_give_the_ridge_classifier(tmp: Path, shared_cache: Path):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "ranpac", "projection_dim": 32}))
    prep = prepare(cfg)
    s, exps = prep.strategy, prep.bench.experiences
    for exp in exps:
        s.before_experience(exp)
        for x, y in exp.train.batches(7, torch.Generator().manual_seed(0)):
            s.observe(x, y, exp.task_id)
        s.after_experience(exp)
    x_all = torch.cat([e.train.x for e in exps])
    y_all = torch.cat([e.train.y for e in exps])
    h = torch.relu(x_all.float() @ s.W_rand).double()
    torch.testing.assert_close(s.G, h.T @ h, rtol=1e-6, atol=1e-6)  # float32 projections, batched differently
    y1 = torch.nn.functional.one_hot(y_all, 6).double()
    torch.testing.assert_close(s.C, h.T @ y1, rtol=1e-6, atol=1e-6)
    x = exps[0].test.x[:5]
    expected = (torch.relu(x.float() @ s.W_rand).double() @ torch.linalg.solve(h.T @ h + s.ridge * torch.eye(32, dtype=torch.float64), h.T @ y1)).float()
    torch.testing.assert_close(s.predict(x, None), expected, rtol=1e-4, atol=1e-4)
