"""Lightning training for any Pyro ``(model, guide, loss)`` triple, and VAE runs on disk.

:class:`VAELightningModule` optimises ``loss(model, guide, x, step=...)`` (see
:mod:`vilab.inference.objectives`) with Adam, logs the training objective and the validation
ELBO split, stops on a non-finite loss naming the batch, and stores the RNG state in its
checkpoints so a resumed run repeats the uninterrupted one exactly. :func:`fit_lightning` wires
it to a ``Trainer`` with atomic checkpoints, CSV (and TensorBoard, when installed) logs, early
stopping and seeds; it scales out with ``devices``/``strategy`` (e.g. ``"ddp_spawn"`` on CPUs).
:func:`train_vae` adds the run directory: ``config.json``, ``model.safetensors``,
``checkpoints/{last,best}.ckpt`` and ``logs/``; :func:`load_run` reads it back without executing
code.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Optional

import lightning.pytorch as pl
import pyro
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from torch import nn
from torch.utils.data import DataLoader

from vilab.datasets import ImageData, make_loader
from vilab.inference.checkpoints import AtomicCheckpointIO, load_checkpoint, load_module, save_module
from vilab.inference.objectives import ELBOLoss, IWAELoss, KLAnnealing, PyroELBOLoss, as_loss, elbo_terms
from vilab.models.vae import VAE, VAEConfig, build_vae

__all__ = [
    "NonFiniteLossError",
    "VAELightningModule",
    "TrainingConfig",
    "TrainingResult",
    "fit_lightning",
    "train_vae",
    "load_run",
    "read_metrics",
    "OBJECTIVES",
]

OBJECTIVES = ("elbo", "trace", "iwae")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names epoch, batch and step."""


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class VAELightningModule(pl.LightningModule):
    """Train a Pyro model/guide pair with a per-datapoint loss.

    Args:
        model: Pyro model ``model(x)`` (an ``nn.Module`` so its parameters are trained).
        guide: Pyro guide ``guide(x)`` (an ``nn.Module``).
        loss: ``loss(model, guide, x, *, step) -> LossOutput``, a ``pyro.infer.ELBO``, or one of
            ``"elbo"``, ``"trace"``, ``"iwae"``.
        learning_rate: Adam step size.
    """

    def __init__(self, model: nn.Module, guide: nn.Module, loss: Any = "elbo", *,
                 learning_rate: float = 1e-3):
        super().__init__()
        for name, module in (("model", model), ("guide", guide)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module so Lightning can train its "
                                f"parameters; got {type(module).__name__}")
        self.model, self.guide = model, guide
        self.loss_fn = as_loss(loss)
        self.learning_rate = learning_rate
        self._pending_rng_state = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = _images(batch)
        output = self.loss_fn(self.model, self.guide, x, step=self.global_step)
        if not torch.isfinite(output.loss):
            raise NonFiniteLossError(
                f"training loss is {output.loss.item()} at epoch {self.current_epoch}, batch "
                f"{batch_idx} (global step {self.global_step}); training stopped before the "
                "update, so the last saved checkpoint is the last good state")
        self.log("train/loss", output.loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=x.shape[0])
        for key, value in output.metrics.items():
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return output.loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = _images(batch)
        terms = elbo_terms(self.model, self.guide, x)
        size = x.shape[0]
        self.log("val/elbo", terms.elbo.mean(), prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/reconstruction", terms.reconstruction.mean(), sync_dist=True,
                 batch_size=size)
        self.log("val/kl", terms.kl.mean(), sync_dist=True, batch_size=size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = pyro.util.get_rng_state()
        numpy_state = state["numpy"]
        # Tensors and plain tuples only, so the checkpoint loads with weights_only=True.
        checkpoint["vilab_rng_state"] = {
            "torch": state["torch"], "random": state["random"],
            "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:])}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("vilab_rng_state")
        if saved is not None:
            numpy_state = saved["numpy"]
            pyro.util.set_rng_state({
                "torch": saved["torch"], "random": saved["random"],
                "numpy": (numpy_state[0], numpy_state[1].numpy(), *numpy_state[2:])})


@dataclass
class TrainingConfig:
    """Training settings (saved in ``config.json``).

    Attributes:
        max_epochs: Epoch budget.
        batch_size: Minibatch size.
        learning_rate: Adam step size.
        objective: ``"elbo"`` (analytic KL where possible), ``"trace"`` (Pyro ``Trace_ELBO``)
            or ``"iwae"``.
        iwae_samples: ``k`` for the IWAE objective.
        kl_warmup_steps: Linear KL annealing from 0 to 1 over this many steps (0: off).
        free_bits: Free-bits floor in nats per latent dimension (0: off).
        patience: Early-stopping patience in epochs on validation ELBO (``None``: off).
        seed: Seed for Python, NumPy, torch and Pyro.
        devices: Number of processes/devices.
        strategy: Lightning strategy (``"auto"``, ``"ddp_spawn"``...).
        accelerator: Lightning accelerator (``"cpu"``, ``"auto"``...).
        progress: Show the progress bar.
        gradient_clip: Clip gradient norm (``None``: off).
        max_time: Wall-clock budget ``"DD:HH:MM:SS"`` (``None``: no limit).
    """

    max_epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    objective: str = "elbo"
    iwae_samples: int = 5
    kl_warmup_steps: int = 0
    free_bits: float = 0.0
    patience: Optional[int] = None
    seed: int = 0
    devices: int = 1
    strategy: str = "auto"
    accelerator: str = "cpu"
    progress: bool = True
    gradient_clip: Optional[float] = None
    max_time: Optional[str] = None

    def make_loss(self):
        """The loss callable these settings describe."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}; "
                             f"got {self.objective!r}")
        if self.objective == "iwae":
            return IWAELoss(self.iwae_samples)
        if self.objective == "trace":
            return PyroELBOLoss(pyro.infer.Trace_ELBO())
        return ELBOLoss(beta=KLAnnealing(self.kl_warmup_steps), free_bits=self.free_bits)


class TrainingResult(NamedTuple):
    """What :func:`fit_lightning` / :func:`train_vae` return."""

    module: VAELightningModule
    trainer: pl.Trainer
    last_checkpoint: str
    best_checkpoint: Optional[str]
    wall_time: float


def fit_lightning(model: nn.Module, guide: nn.Module, loss: Any, train_loader: DataLoader,
                  val_loader: Optional[DataLoader], out_dir: str, *,
                  config: Optional[TrainingConfig] = None, resume: bool = True) -> TrainingResult:
    """Train ``(model, guide, loss)`` with Lightning into ``out_dir``.

    Checkpoints go to ``out_dir/checkpoints`` (``last.ckpt`` every epoch, ``best.ckpt`` on
    validation ELBO), logs to ``out_dir/logs``. With ``resume`` and an existing
    ``last.ckpt`` training continues from it (same epoch, optimizer state and RNG state).

    Raises:
        NonFiniteLossError: when the loss becomes NaN/inf; ``last.ckpt`` keeps the last good state.
    """
    config = config or TrainingConfig()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    module = VAELightningModule(model, guide, loss, learning_rate=config.learning_rate)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    callbacks: list = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", save_last=True,
                                       monitor="val/elbo" if val_loader else None, mode="max")]
    if config.patience is not None and val_loader is not None:
        callbacks.append(EarlyStopping(monitor="val/elbo", mode="max", patience=config.patience))
    # A resumed run logs to a new CSV file; read_metrics concatenates them in order.
    previous = [d for d in os.listdir(os.path.join(out_dir, "logs"))
                if d.startswith("csv")] if os.path.isdir(os.path.join(out_dir, "logs")) else []
    loggers: list = [CSVLogger(out_dir, name="logs", version=f"csv-{len(previous)}")]
    if _TENSORBOARD_AVAILABLE:
        loggers.append(TensorBoardLogger(out_dir, name="logs", version="tensorboard"))
    trainer = pl.Trainer(
        max_epochs=config.max_epochs, accelerator=config.accelerator, devices=config.devices,
        strategy=config.strategy, callbacks=callbacks, logger=loggers,
        plugins=[AtomicCheckpointIO()], enable_progress_bar=config.progress,
        enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=config.gradient_clip, log_every_n_steps=10, deterministic=True,
        max_time=config.max_time)
    last = os.path.join(ckpt_dir, "last.ckpt")
    ckpt_path = last if resume and os.path.exists(last) else None
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)
    best = callbacks[0].best_model_path or None
    return TrainingResult(module, trainer, last, best, time.perf_counter() - start)


def train_vae(vae: VAE, data: ImageData, out_dir: str, *,
              config: Optional[TrainingConfig] = None, resume: bool = True,
              extra: Optional[dict] = None) -> TrainingResult:
    """Train a :class:`~vilab.models.vae.VAE` on ``data`` and save the run to ``out_dir``.

    Training batches of binary data are binarized afresh every time (dynamic binarization);
    validation/test are the fixed binarizations in ``data``. After training the best
    checkpoint's weights (by validation ELBO) are written to ``out_dir/model.safetensors``.

    Raises:
        ValueError: if the model's image shape or levels do not match ``data``.
    """
    config = config or TrainingConfig()
    if vae.config is None:
        raise ValueError("vae: expected a VAE built by build_vae (it needs .config to be saved)")
    if tuple(vae.config.image_shape) != data.image_shape or vae.config.num_levels != data.num_levels:
        raise ValueError(f"vae: the model expects images {vae.config.image_shape} with "
                         f"{vae.config.num_levels} levels; data {data.name!r} has "
                         f"{data.image_shape} with {data.num_levels} levels")
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"),
                {"vae": vae.config.to_dict(), "training": asdict(config), "data": data.name,
                 **(extra or {})})
    train_loader = make_loader(data.train, data.train_labels, batch_size=config.batch_size,
                               shuffle=True, dynamic_binarization=data.num_levels == 2)
    val_loader = make_loader(data.validation, data.validation_labels,
                             batch_size=max(config.batch_size, 256))
    result = fit_lightning(vae.model, vae.guide, config.make_loss(), train_loader, val_loader,
                           out_dir, config=config, resume=resume)
    if result.trainer.is_global_zero:
        source = result.best_checkpoint or result.last_checkpoint
        if os.path.exists(source):
            _load_weights_from_checkpoint(vae, source)
        save_module(vae, os.path.join(out_dir, "model.safetensors"),
                    metadata={"config": json.dumps(vae.config.to_dict()), "checkpoint": source})
    return result


def _load_weights_from_checkpoint(vae: VAE, path: str) -> None:
    state = load_checkpoint(path)["state_dict"]
    vae.load_state_dict(state, strict=True)


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as file:
        json.dump(payload, file, indent=2, default=str)
    os.replace(tmp, path)


def load_run(out_dir: str) -> tuple[VAE, dict]:
    """Rebuild the VAE of a run directory and load ``model.safetensors`` (no code executed).

    Returns:
        ``(vae, config)`` where ``config`` is the parsed ``config.json``.

    Raises:
        FileNotFoundError: if ``out_dir`` is not a run directory.
        vilab.inference.checkpoints.CheckpointError: if the weights are truncated or tampered.
    """
    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"out_dir: {out_dir!r} is not a vilab VAE run (no config.json); "
                                "create one with `vilab vae train --out DIR`")
    with open(config_path) as file:
        config = json.load(file)
    vae = build_vae(VAEConfig.from_dict(config["vae"]))
    load_module(vae, os.path.join(out_dir, "model.safetensors"))
    vae.eval()
    return vae, config


def read_metrics(out_dir: str) -> list[dict[str, float]]:
    """Rows of every ``out_dir/logs/csv-*/metrics.csv`` (resumed runs in order) as dicts.

    Empty cells are dropped.
    """
    import csv

    log_dir = os.path.join(out_dir, "logs")
    if not os.path.isdir(log_dir):
        return []
    rows = []
    versions = sorted((d for d in os.listdir(log_dir) if d.startswith("csv-")),
                      key=lambda d: int(d.split("-")[1]))
    for version in versions:
        path = os.path.join(log_dir, version, "metrics.csv")
        if os.path.isfile(path):
            with open(path) as file:
                rows += [{k: float(v) for k, v in row.items() if v not in ("", None)}
                         for row in csv.DictReader(file)]
    return rows
