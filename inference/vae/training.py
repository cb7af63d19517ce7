"""Lightning training for any Pyro ``(model, guide, loss)`` triple, and VAE runs on disk.

:class:`VAELightningModule` optimises ``loss(model, guide, x, step=...)`` (see
:mod:`vilab.inference.vae.objectives`) with Adam, logs the training objective and the validation
ELBO split, stops on a non-finite loss naming the batch, and stores the RNG state in its
checkpoints so a resumed run repeats the uninterrupted one exactly. :func:`fit_lightning` wires
it to a ``Trainer`` with atomic checkpoints, CSV (and TensorBoard, when installed) logs, seeds,
and a best checkpoint and early stopping on the validation ELBO (for IWAE training, on the
validation ``k``-sample bound it improves); it scales out with ``devices``/``strategy`` (DDP
over gloo on CPUs, see :func:`resolve_strategy`). SIGTERM or SIGINT stops training at once with
:class:`TrainingInterrupted` (DDP workers are killed with it, and die with their parent even
on SIGKILL); checkpoints are written atomically, so ``last.ckpt`` is the last finished epoch
and rerunning the same command resumes from it exactly.
:func:`train_vae` adds the run directory: ``config.json``, ``model.safetensors``,
``checkpoints/{last,best}.ckpt`` and ``logs/``; :mod:`vilab.inference.vae.runs` reads it back
without executing code.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Optional, Sequence

import lightning.pytorch as pl
import pyro
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE
from torch import nn
from torch.utils.data import DataLoader

from vilab.datasets import ImageData, make_loader
from vilab.errors import NonFiniteLossError, TrainingInterrupted
from vilab.inference.vae.checkpoints import AtomicCheckpointIO, load_checkpoint
from vilab.inference.vae.objectives import (
    ELBOLoss,
    IWAELoss,
    KLAnnealing,
    PyroELBOLoss,
    as_loss,
    elbo_terms,
    iwae_bound,
)
from vilab.inference.common.progress import is_interactive
from vilab.inference.vae.schedules import PlateauSchedule

# Re-exported: the run-directory helpers were first importable from here.
from vilab.inference.vae.progress import EpochStatus
from vilab.inference.vae.runs import (
    check_run_folder,
    finish_run,
    load_run,
    read_metrics,
    save_weights,
    set_aside_run,
    write_json,
)
from vilab.models.vae.vae import VAE

from vilab.inference.vae.callbacks import (
    RunFolderCheckpoint,
    resolve_strategy,
    _WorkerGuard,
    _stop_on_signals,
    _TrimResumedLogs,
    _remove_stale_temporaries,
    fix_cublas_workspace,
)  # noqa: F401 -- re-exported

__all__ = [
    "NonFiniteLossError",
    "TrainingInterrupted",
    "VAELightningModule",
    "TrainingConfig",
    "TrainingResult",
    "fit_lightning",
    "fix_cublas_workspace",
    "train_vae",
    "load_run",
    "finish_run",
    "read_metrics",
    "resolve_strategy",
    "OBJECTIVES",
]

OBJECTIVES = ("elbo", "trace", "iwae")


def _rng_state(state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Pyro's RNG state (default: the current one) as tensors and tuples only, so checkpoints
    load with ``weights_only=True``."""
    state = pyro.util.get_rng_state() if state is None else state
    numpy_state = state["numpy"]
    return {
        "torch": state["torch"],
        "random": state["random"],
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
    }


def _set_rng_state(saved: dict[str, Any]) -> None:
    numpy_state = saved["numpy"]
    pyro.util.set_rng_state(
        {
            "torch": saved["torch"],
            "random": saved["random"],
            "numpy": (numpy_state[0], numpy_state[1].numpy(), *numpy_state[2:]),
        }
    )


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
        validate_distributions: Keep Pyro's per-call argument and support checks on in
            training steps. Off by default: they repeat every step what the model's own data
            check and the non-finite-loss guard already catch, at about 5% of a step's time.
            Validation steps always keep them.
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        loss: Any = "elbo",
        *,
        learning_rate: float = 1e-3,
        validate_distributions: bool = False,
    ):
        super().__init__()
        for name, module in (("model", model), ("guide", guide)):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"{name}: expected an nn.Module so Lightning can train its parameters; got {type(module).__name__}"
                )
        self.model, self.guide = model, guide
        self.loss_fn = as_loss(loss)
        self.learning_rate = learning_rate
        self.validate_distributions = validate_distributions

    def compute_loss(self, x: torch.Tensor, step: int = 0):
        """The training objective on a batch ``x``: a :class:`~vilab.inference.vae.objectives.LossOutput`."""
        with pyro.validation_enabled(self.validate_distributions):
            return self.loss_fn(self.model, self.guide, x, step=step)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = _images(batch)
        output = self.compute_loss(x, self.global_step)
        if not torch.isfinite(output.loss):
            raise NonFiniteLossError(
                f"training loss is {output.loss.item()} at epoch {self.current_epoch}, batch "
                f"{batch_idx} (global step {self.global_step}); training stopped before the "
                "update, so the last saved checkpoint is the last good state"
            )
        # sync_dist averages the epoch aggregates over DDP processes (a no-op in one process).
        self.log(
            "train/loss", output.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0], sync_dist=True
        )
        for key, value in output.metrics.items():
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        return output.loss

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint and stops early: the ELBO, or
        for IWAE training the ``k``-sample bound. IWAE training loosens the ELBO on purpose
        (its encoder spreads out to serve ``k`` samples), so a best-ELBO rule would keep its
        least-trained model."""
        return "val/iwae" if isinstance(self.loss_fn, IWAELoss) else "val/elbo"

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = _images(batch)
        terms = elbo_terms(self.model, self.guide, x)
        size = x.shape[0]
        self.log("val/elbo", terms.elbo.mean(), prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/reconstruction", terms.reconstruction.mean(), sync_dist=True, batch_size=size)
        self.log("val/kl", terms.kl.mean(), sync_dist=True, batch_size=size)
        if self.monitor == "val/iwae":
            bound = iwae_bound(self.model, self.guide, x, num_samples=self.loss_fn.num_samples)
            self.log("val/iwae", bound.mean(), prog_bar=True, sync_dist=True, batch_size=size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)

    def setup(self, stage: str) -> None:
        # Lightning seeds every DDP process alike (so initial weights agree); give each rank
        # its own stream for reparameterization noise and dynamic binarization. A resumed
        # run then restores each rank's saved stream in on_load_checkpoint.
        if self.trainer.world_size > 1:
            pyro.set_rng_seed(torch.initial_seed() + self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = pyro.util.get_rng_state()
        checkpoint["vilab_rng_state"] = _rng_state(state)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.trainer.world_size > 1 and distributed:
            # Every rank calls this hook for every save, so the gather cannot deadlock. Tensors
            # do not survive all_gather_object's pickling here, so the torch state goes as bytes.
            state["torch"] = state["torch"].numpy().tobytes()
            states: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, state)
            for item in states:
                item["torch"] = torch.frombuffer(bytearray(item["torch"]), dtype=torch.uint8)
            checkpoint["vilab_rng_state_per_rank"] = [_rng_state(item) for item in states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get("vilab_rng_state_per_rank")
        if per_rank is not None and len(per_rank) == self.trainer.world_size:
            _set_rng_state(per_rank[self.global_rank])
        elif checkpoint.get("vilab_rng_state") is not None:
            _set_rng_state(checkpoint["vilab_rng_state"])


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
        patience: Early-stopping patience in epochs on the validation ELBO, or on the
            validation IWAE bound for ``objective="iwae"`` (``None``: off).
        seed: Seed for Python, NumPy, torch and Pyro.
        devices: Number of processes/devices.
        strategy: Lightning strategy; ``"auto"`` picks DDP for ``devices > 1`` on CPUs (see
            :func:`resolve_strategy`); ``"ddp_spawn"``, ``"ddp_fork"``... are passed through.
        accelerator: Lightning accelerator (``"cpu"``, ``"auto"``...).
        progress: Show the progress bar.
        gradient_clip: Clip gradient norm (``None``: off).
        max_time: Wall-clock budget ``"DD:HH:MM:SS"`` (``None``: no limit).
        validate_distributions: Pyro's distribution checks in training steps (see
            :class:`VAELightningModule`).
        lr_decay: Multiply the learning rate by this factor in ``(0, 1)`` when the validation
            metric that ``patience`` watches has not improved for ``lr_patience`` epochs
            (``None``: a constant learning rate). Needs validation data.
        lr_patience: Epochs without improvement before each decay.
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
    validate_distributions: bool = False
    lr_decay: Optional[float] = None
    lr_patience: int = 10

    def check_schedule(self) -> None:
        """Raise ``ValueError`` unless the plateau schedule's settings are usable."""
        if self.lr_decay is not None and not 0.0 < self.lr_decay < 1.0:
            raise ValueError(f"lr_decay: expected a factor in (0, 1); got {self.lr_decay!r}")
        if not isinstance(self.lr_patience, int) or self.lr_patience < 0:
            raise ValueError(f"lr_patience: expected a non-negative integer; got {self.lr_patience!r}")

    def make_loss(self):
        """The loss callable these settings describe."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
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


def fit_lightning(
    model: nn.Module,
    guide: nn.Module,
    loss: Any,
    train_loader: DataLoader,
    val_loader: Optional[DataLoader],
    out_dir: str,
    *,
    config: Optional[TrainingConfig] = None,
    resume: bool = True,
    callbacks: Sequence[Callback] = (),
) -> TrainingResult:
    """Train ``(model, guide, loss)`` with Lightning into ``out_dir``.

    Checkpoints go to ``out_dir/checkpoints`` (``last.ckpt`` every epoch, ``best.ckpt`` on
    validation ELBO), logs to ``out_dir/logs``. With ``resume`` and an existing
    ``last.ckpt`` training continues from it (same epoch, optimizer state and RNG state).
    With ``config.devices > 1`` the batch size is per process (DDP averages the gradients).

    Args:
        callbacks: Extra Lightning callbacks (e.g. a custom stopping rule).

    Raises:
        NonFiniteLossError: when the loss becomes NaN/inf; ``last.ckpt`` keeps the last good state.
        TrainingInterrupted: on SIGTERM/SIGINT; ``last.ckpt`` keeps the last finished epoch.
    """
    config = config or TrainingConfig()
    strategy = resolve_strategy(config.devices, config.strategy, config.accelerator)
    if config.accelerator != "cpu":
        fix_cublas_workspace()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    config.check_schedule()
    if config.lr_decay is not None and val_loader is None:
        raise ValueError("lr_decay: the plateau schedule watches the validation metric; got no validation data")
    module = VAELightningModule(
        model, guide, loss, learning_rate=config.learning_rate, validate_distributions=config.validate_distributions
    )
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    _remove_stale_temporaries(ckpt_dir)
    # Two checkpoints: Lightning's save_last only writes when the monitored one improves, so
    # "last" is its own unmonitored checkpoint, overwritten every epoch (what a resume needs).
    all_callbacks: list = [
        RunFolderCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=module.monitor if val_loader else None, mode="max"
        ),
        RunFolderCheckpoint(
            dirpath=ckpt_dir, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
        ),
        _WorkerGuard(os.getpid(), forked=strategy in ("ddp_fork", "ddp_notebook")),
    ]
    if config.patience is not None and val_loader is not None:
        all_callbacks.append(EarlyStopping(monitor=module.monitor, mode="max", patience=config.patience))
    # On a terminal Lightning's bar; in a log, one line per epoch (a bar there is ~87 kB an epoch).
    bar = config.progress and is_interactive()
    if config.progress and not bar:
        all_callbacks.append(EpochStatus())
    all_callbacks += list(callbacks)
    if config.lr_decay is not None:
        # After the caller's callbacks: it acts on the metric they leave.
        all_callbacks += [
            PlateauSchedule(module.monitor, config.lr_decay, config.lr_patience),
            LearningRateMonitor(logging_interval="epoch"),
        ]
    # A resumed run logs to a new CSV file; read_metrics concatenates them in order.
    previous = (
        [d for d in os.listdir(os.path.join(out_dir, "logs")) if d.startswith("csv")]
        if os.path.isdir(os.path.join(out_dir, "logs"))
        else []
    )
    version = f"csv-{len(previous)}"
    all_callbacks.append(_TrimResumedLogs(out_dir, version))
    last = os.path.join(ckpt_dir, "last.ckpt")
    ckpt_path = last if resume and os.path.exists(last) else None
    loggers: list = [CSVLogger(out_dir, name="logs", version=version)]
    if _TENSORBOARD_AVAILABLE:
        # TensorBoard appends to its event files: on a resume it is told to hide the events
        # the stopped process logged at or after the checkpoint's step (logged again now), as
        # _TrimResumedLogs drops those CSV rows.
        purge = {"purge_step": load_checkpoint(ckpt_path)["global_step"]} if ckpt_path else {}
        loggers.append(TensorBoardLogger(out_dir, name="logs", version="tensorboard", **purge))
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=strategy,
        callbacks=all_callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=config.gradient_clip,
        log_every_n_steps=10,
        deterministic=True,
        max_time=config.max_time,
    )
    start = time.perf_counter()
    with _stop_on_signals(trainer):
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)
    best = all_callbacks[0].best_model_path or None
    return TrainingResult(module, trainer, last, best, time.perf_counter() - start)


def train_vae(
    vae: VAE,
    data: ImageData,
    out_dir: str,
    *,
    config: Optional[TrainingConfig] = None,
    resume: bool = True,
    extra: Optional[dict] = None,
    callbacks: Sequence[Callback] = (),
) -> TrainingResult:
    """Train a :class:`~vilab.models.vae.vae.VAE` on ``data`` and save the run to ``out_dir``.

    Training batches of binary data are binarized afresh every time (dynamic binarization);
    validation/test are the fixed binarizations in ``data``. After training the best
    checkpoint's weights (by validation ELBO) are written to ``out_dir/model.safetensors``.

    ``out_dir`` may hold a run already: with ``resume`` it must have been trained with the same
    settings, except those in :data:`~vilab.inference.vae.runs.RESUMABLE_SETTINGS` (epochs,
    patience...), whose changes ``config.json`` records under ``"resumes"``; without
    ``resume`` the old run is moved aside to ``out_dir.old-N`` (with a ``UserWarning``).
    ``config.json`` is written only once these checks pass.

    Raises:
        ValueError: if the model's image shape or levels do not match ``data``.
        vilab.run_folders.RunFolderError: (a ``ValueError``) if ``out_dir`` is a file, a
            non-empty folder that is no run, or a run with other settings (each one named).
        TrainingInterrupted: on SIGTERM/SIGINT (see :func:`fit_lightning`).
    """
    config = config or TrainingConfig()
    if vae.config is None:
        raise ValueError("vae: expected a VAE built by build_vae (it needs .config to be saved)")
    if tuple(vae.config.image_shape) != data.image_shape or vae.config.num_levels != data.num_levels:
        raise ValueError(
            f"vae: the model expects images {vae.config.image_shape} with "
            f"{vae.config.num_levels} levels; data {data.name!r} has "
            f"{data.image_shape} with {data.num_levels} levels"
        )
    # Lightning keeps each submodule's mode, and a run read back by load_run is in eval mode.
    vae.train()
    config.check_schedule()  # bad settings fail here, before a run is moved or config.json written
    config.make_loss()
    resolve_strategy(config.devices, config.strategy, config.accelerator)
    run_config = {"vae": vae.config.to_dict(), "training": asdict(config), "data": data.name, **(extra or {})}
    if not resume:
        moved = set_aside_run(out_dir)
        if moved is not None:
            warnings.warn(
                f"train_vae: resume=False: the run in {out_dir!r} was moved to {moved!r}", UserWarning, stacklevel=2
            )
    run_config = check_run_folder(out_dir, run_config)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "config.json"), run_config)
    train_loader = make_loader(
        data.train,
        data.train_labels,
        batch_size=config.batch_size,
        shuffle=True,
        dynamic_binarization=data.num_levels == 2,
    )
    val_loader = make_loader(data.validation, data.validation_labels, batch_size=max(config.batch_size, 256))
    result = fit_lightning(
        vae.model,
        vae.guide,
        config.make_loss(),
        train_loader,
        val_loader,
        out_dir,
        config=config,
        resume=resume,
        callbacks=callbacks,
    )
    if result.trainer.is_global_zero:
        save_weights(vae, out_dir, result.best_checkpoint or result.last_checkpoint)
    return result
