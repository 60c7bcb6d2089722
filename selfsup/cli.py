"""The ``selfsup`` command: LightningCLI for ``fit``/``validate``; ``eval``/``export`` in selfsup.eval.command.

    selfsup fit --config recipes/demo/simclr.yaml [--trainer.max_epochs 5] [--ckpt_path last]

The YAML keys are the ``__init__`` arguments of the model (an :class:`SSLMethod` subclass), the
data module and the Trainer, as LightningCLI exposes them. The data module is :class:`SSLDataModule`
unless ``data:`` names another ``LightningDataModule`` by ``class_path``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from selfsup.data.datamodule import SSLDataModule
from selfsup.methods.base import SSLMethod
from selfsup.run import (DataHealth, DataWait, ExactResume, InitFrom, NonFiniteGuard, PreemptionCheckpoint,
                         default_plugins, find_resume_checkpoint)

ROOT_DIR_PLACEHOLDER = "<trainer.default_root_dir>"  # a logger's save_dir that follows the run directory
DEFAULT_DATAMODULE = f"{SSLDataModule.__module__}.{SSLDataModule.__qualname__}"  # `data:` without a class_path


class SelfSupCLI(LightningCLI):
    """LightningCLI with selfsup's defaults: one run directory, ``trainer.default_root_dir``, holding the
    CSV logs, ``config.yaml`` and the checkpoints; a rich progress bar; and one ``last.ckpt`` in
    ``<default_root_dir>/checkpoints`` that always holds the newest weights (no ``last-vN`` copies after a
    resume). ``--ckpt_path last`` resumes from the newest complete ``last.ckpt`` or ``hpc_ckpt_N.ckpt``
    (:func:`selfsup.run.find_resume_checkpoint`). The run callbacks of :mod:`selfsup.run` are installed,
    each a YAML group: ``resume`` (exact resume), ``nonfinite`` (the guard), ``data_health``,
    ``data_wait`` (``data/wait_fraction``), ``preemption`` (SIGTERM saves ``last.ckpt``) and ``init_from``.
    Checkpoints are written atomically, and ``--trainer.sync_batchnorm true`` uses a SyncBatchNorm that also
    runs on CPU. ``data:`` is an :class:`SSLDataModule` unless it names another data module's ``class_path``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(ExactResume, "resume")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(DataHealth, "data_health")
        parser.add_lightning_class_args(DataWait, "data_wait")
        parser.add_lightning_class_args(InitFrom, "init_from")
        # Without the version counter a resumed run writes last.ckpt again instead of last-v1.ckpt: the
        # counter skips every existing name but the callback's own last_model_path, which a resume from a
        # checkpoint saved before the first periodic save (SIGTERM, SIGUSR1) does not hold.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_epochs": 1,
                             "checkpoint.enable_version_counter": False})
        if self.subclass_mode_data:
            # The data module when a config names none. jsonargparse reads a `data:` dict without class_path
            # as the init arguments of the class_path before it, this default, so the recipes' plain
            # `data: {dataset: ..., batch_size: ...}` and `--data.dataset x` keep meaning SSLDataModule.
            parser.set_defaults({"data": {"class_path": DEFAULT_DATAMODULE}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or "runs/default"
        config.trainer.default_root_dir = root
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        config.trainer.logger = loggers_in_run_directory(config.trainer.logger, root)
        if config.get("ckpt_path") == "last" and "://" not in f"{config.checkpoint.dirpath}{root}":
            config.ckpt_path = find_resume_checkpoint(config.checkpoint.dirpath, root)  # None: start afresh

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        kwargs["plugins"] = default_plugins(kwargs.get("plugins", config.get("plugins")),
                                            bool(config.get("sync_batchnorm")))
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        """Leave out the progress bar with ``trainer.enable_progress_bar: false`` and the checkpoint
        callbacks with ``trainer.enable_checkpointing: false``: Lightning refuses either flag beside the
        callback it turns off."""
        unwanted: list[type] = []
        if config.get("enable_progress_bar") is False:
            unwanted.append(RichProgressBar)
        if config.get("enable_checkpointing") is False:
            unwanted += [ModelCheckpoint, PreemptionCheckpoint, ExactResume]
        return super()._instantiate_trainer(config, [c for c in callbacks if not isinstance(c, tuple(unwanted))])


def loggers_in_run_directory(logger: Any, root: str) -> Any:
    """The configured logger(s) with ``save_dir`` set to the run directory ``root`` where it is
    :data:`ROOT_DIR_PLACEHOLDER` or ``None``, so logs land beside the checkpoints. A chosen ``save_dir``
    stays, and a logger class without a ``save_dir`` argument gets none."""
    if isinstance(logger, list):
        return [loggers_in_run_directory(item, root) for item in logger]
    init_args = logger.get("init_args") if isinstance(logger, (dict, Namespace)) else None
    if init_args is not None and init_args.get("save_dir", "") in (None, ROOT_DIR_PLACEHOLDER):  # "": no such arg
        init_args["save_dir"] = root
    return logger


def trainer_defaults() -> dict:
    """The CSV logger, writing into the run directory (``trainer.default_root_dir``) unless told otherwise."""
    return {
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": ROOT_DIR_PLACEHOLDER}},
    }


USAGE = """usage: selfsup {fit,validate,eval,export,shards} ...

  fit        pretrain: selfsup fit --config recipes/demo/simclr.yaml [--ckpt_path last]
  validate   run the validation loop of a recipe (LightningCLI)
  eval       score checkpoints: selfsup eval --ckpt RUN.ckpt --protocols knn,linear,fewshot
  export     write the encoder for timm: selfsup export --ckpt RUN.ckpt --out DIR
  shards     write an image folder as WebDataset tar shards: selfsup shards write FOLDER OUT

fit and validate take LightningCLI options (--config, --model.*, --data.*, --trainer.*); eval and export
take their own flags (selfsup eval --help), as does shards: they configure no Trainer, model or data module class.
"""


def main(args: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # Lightning 2.6, torch 2.14
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "eval":  # scoring: selfsup/eval/command.py
        from selfsup.eval.command import main as evaluate

        return evaluate(argv[1:])
    if argv[0] == "shards":  # writing and indexing tar shards: selfsup/data/shard_writer.py
        from selfsup.data.shard_writer import main as shards

        return shards(argv[1:])
    if argv[0] == "export":
        from selfsup.export import main as export

        return export(argv[1:])
    selfsup_cli(args)


def selfsup_cli(args: list[str] | None = None, run: bool = True) -> SelfSupCLI:
    """The LightningCLI of ``selfsup fit``/``validate``: any :class:`SSLMethod` as ``model``, and as ``data``
    any ``LightningDataModule`` by ``class_path``, by default :class:`SSLDataModule` (so a ``data:`` section
    of its init arguments alone, as the recipes write it, is an ``SSLDataModule``). ``run=False`` parses
    and instantiates without a subcommand."""
    return SelfSupCLI(SSLMethod, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      trainer_defaults=trainer_defaults(), save_config_kwargs={"overwrite": True}, args=args,
                      run=run, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
