"""FeCAM: moments, shrinkage, correlation and distances against numpy; prediction, Tukey, state, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl.cli import main as cli_main
from cl.config import ConfigError, parse_run_config
from cl.engine.loop import prepare
from cl.strategies.fecam import correlation, mahalanobis, merge_moments, pack_upper, shrink, unpack_upper
from tests.conftest import tiny_config, write_yaml
from tests.test_peft_per_task import VIT


def np_shrink(cov: np.ndarray, a1: float, a2: float) -> np.ndarray:
    off = cov.copy()
    np.fill_diagonal(off, 0.0)
    mask = off != 0
    m_o = off[mask].mean()
    eye = np.eye(len(cov))
    return cov + a1 * np.mean(np.diag(cov)) * eye + a2 * m_o * (1 - eye)


def np_corr(cov: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.diag(cov))
    return cov / np.outer(sd, sd)


def make(tmp: Path, cache: Path, **strategy):
    return prepare(parse_run_config(tiny_config(tmp, cache_dir=str(cache), strategy={"name": "fecam", **strategy})))


def train(s, exps, batch: int = 7) -> None:
    for exp in exps:
        s.before_experience(exp)
        for x, y in exp.train.batches(batch, torch.Generator().manual_seed(exp.index)):
            assert s.observe(x, y, exp.task_id) == {}
        s.after_experience(exp)


def test_merged_moments_equal_numpy_mean_and_unbiased_covariance():
    x = torch.randn(23, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 10
    n, mean, scatter = torch.zeros((), dtype=torch.float64), torch.zeros(5, dtype=torch.float64), torch.zeros(5, 5, dtype=torch.float64)
    for part in (x[:1], x[1:9], x[9:]):  # uneven batches, one of a single sample
        n, mean, scatter = merge_moments(n, mean, scatter, part)
    assert float(n) == 23
    np.testing.assert_allclose(mean.numpy(), x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose((scatter / (n - 1)).numpy(), np.cov(x.numpy().T), rtol=1e-10)


def test_pack_round_trip():
    a = torch.randn(4, 4, dtype=torch.float64)
    sym = a + a.T
    assert pack_upper(sym).shape == (10,)
    assert torch.equal(unpack_upper(pack_upper(sym), 4), sym)


def test_shrink_and_correlation_against_numpy():
    g = np.random.default_rng(0)
    cov = np.cov(g.normal(size=(30, 6)).T)
    cov[0, 1] = cov[1, 0] = 0.0  # zero off-diagonal entries do not count in m_o
    for a1, a2 in ((1.0, 0.0), (10.0, 10.0), (0.5, 2.0)):
        shrunk = shrink(torch.from_numpy(cov), a1, a2).numpy()
        np.testing.assert_allclose(shrunk, np_shrink(cov, a1, a2), rtol=1e-12)
        np.testing.assert_allclose(correlation(torch.from_numpy(shrunk)).numpy(), np_corr(shrunk), rtol=1e-12)
    # by hand: diag (2, 4) mean 3, off-diagonal 1; α1 = 1, α2 = 1 -> [[5, 2], [2, 7]], correlation 2/sqrt(35)
    small = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    assert torch.equal(shrink(small, 1.0, 1.0), torch.tensor([[5.0, 2.0], [2.0, 7.0]], dtype=torch.float64))
    assert correlation(shrink(small, 1.0, 1.0))[0, 1].item() == pytest.approx(2 / 35**0.5)


def test_zero_variance_feature_gets_unit_variance_not_nan():
    cov = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(correlation(cov), torch.eye(2, dtype=torch.float64))


def test_mahalanobis_against_numpy():
    g = np.random.default_rng(1)
    x, means = g.normal(size=(4, 3)), g.normal(size=(2, 3))
    precisions = []
    for _ in range(2):
        a = g.normal(size=(3, 3))
        precisions.append(np.linalg.pinv(a @ a.T + np.eye(3)))
    expected = np.array([[(xi - m) @ p @ (xi - m) for m, p in zip(means, precisions)] for xi in x])
    got = mahalanobis(torch.from_numpy(x), torch.from_numpy(means), torch.from_numpy(np.stack(precisions)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("options", [{}, {"alpha1": 10.0, "alpha2": 10.0, "normalize": False}])
def test_scores_are_minus_the_numpy_fecam_distance(tmp: Path, shared_cache: Path, options: dict):
    prep = make(tmp, shared_cache, **options)
    s, exps = prep.strategy, prep.bench.experiences
    assert s.ctx.cached_features
    train(s, exps[:2])  # four classes seen; the last two unseen
    a1, a2 = options.get("alpha1", 1.0), options.get("alpha2", 0.0)
    norm = (lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)) if options.get("normalize", True) else (lambda v: v)
    feats = np.concatenate([norm(e.train.x.double().numpy()) for e in exps[:2]])
    labels = np.concatenate([e.train.y.numpy() for e in exps[:2]])
    x = exps[0].test.x[:6]
    q = norm(x.double().numpy())
    expected = np.zeros((6, 4))
    for c in range(4):
        fc = feats[labels == c]
        mu = fc.mean(0)
        np.testing.assert_allclose(s.means[c].numpy(), mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s.covariance(c).numpy(), np.cov(fc.T), rtol=1e-7, atol=1e-12)
        inv = np.linalg.pinv(np_corr(np_shrink(np.cov(fc.T), a1, a2)))
        expected[:, c] = -np.einsum("bi,ij,bj->b", q - mu, inv, q - mu)
    scores = s.predict(x, None)
    np.testing.assert_allclose(scores[:, :4].numpy(), expected, rtol=2e-3, atol=2e-3)  # float32 precisions and queries
    assert torch.isinf(scores[:, 4:]).all() and (scores[:, 4:] < 0).all()  # unseen classes: -inf
    assert torch.equal(scores.argmax(1), torch.from_numpy(expected.argmax(1)))  # nearest class in Mahalanobis distance


def test_before_any_experience_everything_is_minus_inf(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache)
    scores = prep.strategy.predict(prep.bench.experiences[0].test.x[:3], None)
    assert scores.shape == (3, 6) and torch.isneginf(scores).all()


def test_precisions_are_cached_and_invalidated_by_new_samples(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    s.observe(exp.train.x[:20], exp.train.y[:20], 0)
    x = exp.test.x[:4]
    s.predict(x, None)
    cached = {c: p for c, p in s._precisions.items()}
    assert set(cached) == set(exp.train.y[:20].unique().tolist())
    s.predict(x, None)
    assert all(s._precisions[c] is p for c, p in cached.items())  # reused, not recomputed
    extra = exp.train.y[20:30]
    s.observe(exp.train.x[20:30], extra, 0)
    assert all(c not in s._precisions for c in extra.unique().tolist())
    s.predict(x, None)
    c = int(extra[0])
    assert not torch.equal(s._precisions[c], cached[c])


def test_a_class_seen_once_is_scored_with_the_identity(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    one = (exp.train.y == 0).nonzero()[0]
    s.observe(exp.train.x[one], exp.train.y[one], 0)
    x = exp.test.x[:3]
    expected = -((F.normalize(x, dim=1) - F.normalize(exp.train.x[one], dim=1)) ** 2).sum(1)
    scores = s.predict(x, None)
    torch.testing.assert_close(scores[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(scores[:, 1:]).all() and not torch.isnan(scores).any()


def test_tukey_is_refused_for_vit_and_for_negative_features(tmp: Path, shared_cache: Path):
    cfg = parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), backbone=VIT, strategy={"name": "fecam", "tukey_beta": 0.5}))
    with pytest.raises(ConfigError, match=r"strategy.tukey_beta: ViT features can be negative"):
        prepare(cfg)
    prep = make(tmp, shared_cache, tukey_beta=0.5)
    s, exp = prep.strategy, prep.bench.experiences[0]
    s.before_experience(exp)
    with pytest.raises(ConfigError, match=r"strategy.tukey_beta: 0.5 needs non-negative features"):
        s.observe(-exp.train.x[:8].abs() - 1, exp.train.y[:8], 0)


def test_tukey_transform_on_resnet_features(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache, tukey_beta=0.5, normalize=False)
    s, exp = prep.strategy, prep.bench.experiences[0]
    assert (exp.train.x >= 0).all()  # ReLU features of a ResNet
    s.before_experience(exp)
    s.observe(exp.train.x, exp.train.y, 0)
    f0 = exp.train.x[exp.train.y == 0].double().sqrt()
    torch.testing.assert_close(s.means[0], f0.mean(0))
    torch.testing.assert_close(s.covariance(0), torch.cov(f0.T))
    assert torch.isfinite(s.predict(exp.test.x[:4], None)[:, :2]).all()
    log = make(tmp, shared_cache, tukey_beta=0.0, normalize=False).strategy
    with pytest.raises(ConfigError, match=r"tukey_beta: 0.0 needs positive features"):
        log.observe(torch.zeros(2, s.ctx.feature_dim), torch.tensor([0, 0]), 0)


def test_refuses_a_trainable_backbone(tmp: Path):
    with pytest.raises(ConfigError, match=r"backbone.trainable: fecam trains nothing"):
        parse_run_config(tiny_config(tmp, backbone={"trainable": "all"}, strategy={"name": "fecam"}))


def test_state_round_trip_and_storage(tmp: Path, shared_cache: Path):
    prep = make(tmp, shared_cache)
    s, exps = prep.strategy, prep.bench.experiences
    train(s, exps)
    x = exps[2].test.x[:8]
    scores = s.predict(x, None)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    fresh = make(tmp, shared_cache).strategy
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(fresh.predict(x, None), scores)
    d = s.ctx.feature_dim
    assert s.storage_bytes() == 6 * (d + d * (d + 1) // 2) * 4


def test_online_single_pass_equals_offline(tmp: Path, shared_cache: Path):
    offline = make(tmp, shared_cache)
    train(offline.strategy, offline.bench.experiences, batch=64)
    online = prepare(parse_run_config(tiny_config(tmp, cache_dir=str(shared_cache), benchmark={"scenario": "online"}, train={"epochs": 1},
                                                  strategy={"name": "fecam"})))
    train(online.strategy, online.bench.experiences, batch=5)
    x = offline.bench.experiences[1].test.x[:8]
    torch.testing.assert_close(online.strategy.predict(x, None), offline.strategy.predict(x, None), rtol=1e-4, atol=1e-4)


def test_cli_end_to_end(tmp: Path, shared_cache: Path):
    path = write_yaml(tmp / "fecam.yaml", tiny_config(tmp, cache_dir=str(shared_cache), strategy={"name": "fecam", "alpha2": 1.0}))
    assert cli_main(["run", str(path)]) == 0
    metrics = json.loads((tmp / "runs" / "tiny" / "fecam" / "seed0" / "metrics.json").read_text())
    assert 0 <= metrics["final_avg_acc"] <= 1 and metrics["trainable_params"] == 0
