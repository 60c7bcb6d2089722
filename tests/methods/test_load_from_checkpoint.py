"""``Method.load_from_checkpoint(path)`` without ``encoder=``: the encoder is rebuilt from the config the
checkpoint stores (``checkpoint["selfsup"]["encoder"]``), for every method."""

from __future__ import annotations

import pytest
import torch

from selfsup.models.encoder import Encoder
from tests.helpers.checkpoints import one_thread  # noqa: F401  (fixture)
from tests.helpers.methods import METHODS, build, same_weights, synthetic_batch, tiny_fit


def _outputs(method, batch) -> dict[str, torch.Tensor]:
    """Pooled features and every loss term on ``batch``, in eval mode, with the same random masks/crops."""
    method.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        terms = method.training_loss(batch)
        return {"pooled": method.encoder(batch.views[0]), **{k: v for k, v in terms.items() if v.ndim == 0}}


@pytest.mark.parametrize("name", METHODS)
def test_load_from_checkpoint_rebuilds_the_encoder(name, tmp_path, one_thread):
    trained, _ = tiny_fit(name, tmp_path, max_steps=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    loaded = type(trained).load_from_checkpoint(last)

    assert type(loaded) is type(trained)
    assert loaded.encoder.config == trained.encoder.config
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    assert same_weights(trained, loaded) == []
    # The same architecture, not just loadable weights (pooling, norms and masking have no parameters):
    # the loaded method computes what a method built the recipe's way and given these weights computes.
    reference, views = build(name, seed=1)
    reference.load_state_dict(torch.load(last, weights_only=True)["state_dict"])
    batch = synthetic_batch(views, 4)
    expected, got = _outputs(reference, batch), _outputs(loaded, batch)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not torch.equal(_outputs(build(name, seed=1)[0], batch)["pooled"], got["pooled"]), \
        "sanity: untrained weights must give other features, else the comparison proves nothing"


def test_explicit_encoder_open_file_and_foreign_checkpoint(tmp_path, one_thread):
    trained, _ = tiny_fit("simclr", tmp_path, max_steps=1)
    encoder = Encoder("test_resnet")
    loaded = type(trained).load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", encoder=encoder)
    assert loaded.encoder is encoder and same_weights(trained, loaded) == []
    with open(tmp_path / "checkpoints" / "last.ckpt", "rb") as f:  # an open file is read from where it is
        assert same_weights(trained, type(trained).load_from_checkpoint(f)) == []
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.ckpt.*no encoder config.*encoder="):
        type(trained).load_from_checkpoint(foreign)

