"""RankMe: the formula against NumPy, its extremes, the warning, 2 ranks against 1 process, and a fit."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfsup.eval.collapse import RankMe, rankme
from tests.helpers.dist import run_distributed


def numpy_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_matches_numpy_and_spans_one_to_the_dimension():
    x = np.random.default_rng(0).normal(size=(50, 12)) * np.linspace(0.1, 3, 12)
    assert rankme(torch.tensor(x)).item() == pytest.approx(numpy_rankme(x), rel=1e-5)
    line = torch.randn(200, 1) @ torch.randn(1, 16)
    assert rankme(line).item() == pytest.approx(1.0, abs=0.01)
    assert rankme(torch.randn(4000, 16)).item() > 0.95 * 16
    with pytest.raises(ValueError, match="rankme"):
        rankme(torch.randn(5))


def _step(callback, features, step, logged):
    trainer = SimpleNamespace(global_step=step)
    module = SimpleNamespace(log=lambda name, value, **kw: logged.append((name, float(value))))
    callback.on_train_batch_end(trainer, module, {"features": features}, None, 0)


def test_logs_every_n_steps_on_the_last_samples_and_warns_on_collapse():
    logged = []
    monitor = RankMe(every_n_steps=2, num_samples=64, warn_fraction=0.01)
    torch.manual_seed(0)
    healthy = [torch.randn(32, 8) for _ in range(3)]
    for step, features in enumerate(healthy, start=1):
        _step(monitor, features, step, logged)
    assert [name for name, _ in logged] == ["train/rankme"]            # step 2 only
    assert logged[0][1] == pytest.approx(rankme(torch.cat(healthy[:2])).item(), rel=1e-5)
    collapsed = torch.randn(32, 1) @ torch.randn(1, 8)
    _step(monitor, collapsed, 4, logged)                                # the buffer: step 3's and step 4's rows
    assert logged[-1][1] == pytest.approx(rankme(torch.cat([healthy[2], collapsed])).item(), rel=1e-5)
    with pytest.warns(UserWarning, match="collapse"):
        _step(monitor, collapsed, 5, logged)
        _step(monitor, collapsed, 6, logged)
    _step(monitor, collapsed, 6, logged)                                # an accumulation micro-step: no new value
    assert [s for s, _ in monitor.values] == [2, 4, 6]
    _step(monitor, None, 8, logged)                                     # no features: nothing
    assert len(monitor.values) == 3


def _rank(rank, world, rows):
    import torch

    from selfsup.eval.collapse import RankMe

    monitor = RankMe(every_n_steps=1, num_samples=2 * rows)
    torch.manual_seed(0)
    everyone = torch.randn(2 * rows, 6) * torch.linspace(0.2, 2, 6)
    _step(monitor, everyone[rank * rows:(rank + 1) * rows], 1, [])
    return monitor.values


def test_two_ranks_give_the_rank_of_their_rows_together():
    ranks = run_distributed(_rank, 2, 10, timeout=60)
    torch.manual_seed(0)
    everyone = torch.randn(20, 6) * torch.linspace(0.2, 2, 6)
    assert ranks[0] == ranks[1] and ranks[0][0][1] == pytest.approx(rankme(everyone).item(), rel=1e-5)


def test_a_fit_logs_rankme(tmp_path):
    from tests.helpers.methods import tiny_fit

    monitor = RankMe(every_n_steps=2, num_samples=16)
    _, trainer = tiny_fit("simclr", tmp_path, 4, callbacks=[monitor])
    assert [s for s, _ in monitor.values] == [2, 4]
    assert all(1.0 <= v <= 16 for _, v in monitor.values)
    assert "train/rankme" in trainer.callback_metrics
