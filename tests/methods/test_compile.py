"""``compile: true`` compiles the encoder in place: the same loss as eager, the same state-dict keys."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.methods import build, synthetic_batch

TOLERANCE = 1e-4  # relative: inductor fuses and reorders float32 arithmetic


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "mae"])
def test_compiled_step_gives_the_eager_loss_and_keeps_the_keys(name):
    eager, views = build(name)
    compiled, _ = build(name)
    keys = list(compiled.state_dict())
    compiled.hparams.compile = True
    compiled.setup_compile()
    assert list(compiled.state_dict()) == keys, "compiling in place keeps the state-dict keys"
    batch = synthetic_batch(views, 8)
    losses = []
    for method in (eager, compiled):
        torch.manual_seed(1)  # the same masks / no randomness difference between the two
        loss = method.training_loss(batch)["loss"]
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=TOLERANCE), losses
    grads = [torch.cat([p.grad.flatten() for p in m.encoder.parameters() if p.grad is not None])
             for m in (eager, compiled)]
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)
