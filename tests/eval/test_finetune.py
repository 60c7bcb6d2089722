"""End-to-end fine-tuning: it learns (beats its starting point), and uses the MAE recipe's pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfsup.checkpoint import encoder_from_checkpoint, load_checkpoint
from selfsup.eval.finetune import FineTuner, finetune_encoder
from selfsup.eval.protocols import EvalContext, EvalData, run_protocols
from tests.helpers.checkpoints import IMAGE_SIZE, one_thread, tiny_data, tiny_fit  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory):
    ckpt = tiny_fit(tmp_path_factory.mktemp("finetune"), steps=2)
    return encoder_from_checkpoint(load_checkpoint(ckpt))


@pytest.fixture(scope="module")
def data() -> EvalData:
    return EvalData.from_datamodule(tiny_data(), train_size=512, test_size=256)


def test_finetuning_improves_over_its_starting_point(pretrained, data: EvalData) -> None:
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    # the recipe's pieces at milder strength: 16-pixel images and 80 steps leave little room for heavy augmentation
    scores = finetune_encoder(pretrained, data, epochs=5, batch_size=32, base_lr=4e-2, crop_scale=(0.5, 1.0),
                              rand_augment_magnitude=5, erasing_p=0.0, mixup=0.2, cutmix=0.0, accelerator="cpu")
    assert scores["steps"] == 5 * (512 // 32)
    assert scores["top1"] > scores["start_top1"] + 0.1, scores
    assert scores["loss"] < scores["start_loss"], scores
    # the given encoder is left untouched (fine-tuning works on a copy)
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items())


def test_optimizer_uses_layer_decay_groups_and_drop_path(pretrained) -> None:
    import lightning as L

    from selfsup.models.encoder import Encoder

    network = Encoder(**{**pretrained.config, "drop_path_rate": 0.1})
    module = FineTuner(network, num_classes=10, layer_decay=0.5, batch_size=32)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=EvalData.from_datamodule(tiny_data(), 64, 32).loader("train"))
    scales = sorted({group["lr_scale"] for group in trainer.optimizers[0].param_groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** (len(scales) - 1))  # head 1, stem smallest
    assert any(type(m).__name__ == "DropPath" for m in network.modules())
    assert module.network.model.get_classifier().out_features == 10


def test_finetune_protocol_rows(pretrained, data: EvalData, tmp_path: Path) -> None:
    small = EvalData(data.train, data.test, data.preprocessing, data.classes, data.identity)
    rows = run_protocols(["finetune"], EvalContext(None, pretrained, small, out_dir=tmp_path),
                         {"finetune": {"epochs": 1, "batch_size": 64, "max_steps": 2}})
    assert [row["metric"] for row in rows] == ["top1", "top5"]
    assert rows[0]["settings"]["steps"] == 2 and rows[0]["settings"]["layer_decay"] == 0.75
    assert rows[0]["settings"]["start_top1"] is not None
    assert any(tmp_path.rglob("metrics.csv")), "the fine-tuning run logs to the output folder"
    with pytest.raises(ValueError, match="needs the encoder and the labelled images"):
        run_protocols(["finetune"], EvalContext(None))
    assert IMAGE_SIZE == small.preprocessing.image_size
