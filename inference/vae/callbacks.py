"""What VAE training needs around Lightning's loop: the strategy for the devices, callbacks that\nguard forked workers and trim a resumed run's logs, checkpoints that follow their run folder when\nit moves, stopping cleanly on SIGTERM/SIGINT, and the CUDA workspace setting for deterministic\nruns."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vilab.errors import TrainingInterrupted

# Re-exported: the run-directory helpers were first importable from here.
from vilab.inference.vae.runs import (
    trim_metrics,
)

__all__ = ["resolve_strategy", "fix_cublas_workspace", "RunFolderCheckpoint"]


def resolve_strategy(devices: int, strategy: str = "auto", accelerator: str = "cpu") -> str:
    """The Lightning strategy :func:`fit_lightning` uses.

    ``"auto"`` with ``devices > 1`` on CPUs becomes ``"ddp_spawn"`` (gloo; fresh worker
    processes, safe everywhere). ``"ddp_fork"`` starts faster (no re-import) and is accepted
    too; its workers run one intra-op thread each, because GNU OpenMP's thread pool does not
    survive ``fork()`` and a forked worker using more threads can hang.

    Raises:
        ValueError: if ``devices`` is not a positive integer.
    """
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices: expected a positive integer; got {devices!r}")
    if strategy == "auto" and devices > 1 and accelerator == "cpu":
        return "ddp_spawn"
    return strategy


class _WorkerGuard(Callback):
    """In DDP worker processes: die with the parent, and one thread after ``fork()``."""

    def __init__(self, parent_pid: int, forked: bool):
        self.parent_pid, self.forked = parent_pid, forked

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if os.getpid() == self.parent_pid:
            return
        if self.forked:
            torch.set_num_threads(1)
        if sys.platform.startswith("linux"):
            import ctypes

            # PR_SET_PDEATHSIG = 1: the kernel sends SIGKILL to this worker if the parent dies
            # (even by SIGKILL), so no orphan keeps training and writing checkpoints.
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
        if os.getppid() != self.parent_pid:
            os._exit(1)  # the parent died before the guard was armed


@contextmanager
def _stop_on_signals(trainer: pl.Trainer) -> Iterator[None]:
    """Turn SIGTERM/SIGINT in the main process into :class:`TrainingInterrupted`.

    Lightning alone would finish the batch and exit with status 0 on SIGTERM, and leave DDP
    workers running when only the parent is signalled; here the workers get SIGKILL (their
    checkpoints are atomic) and the caller gets an exception it can turn into an exit code.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for process in getattr(trainer.strategy.launcher, "procs", None) or []:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGKILL)
        raise TrainingInterrupted(
            f"training stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}"
            f", global step {trainer.global_step}",
            signum,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _TrimResumedLogs(Callback):
    """On a resume, drop the CSV rows that the stopped process logged after its checkpoint: the
    resumed run logs those steps again (a ``kill -9`` mid-epoch would otherwise leave them twice)."""

    def __init__(self, out_dir: str, version: str):
        self.out_dir, self.version = out_dir, version

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here the checkpoint is restored, so global_step is the step it was taken after.
        if trainer.ckpt_path and trainer.is_global_zero:
            trim_metrics(self.out_dir, trainer.global_step, keep=self.version)


def _remove_stale_temporaries(directory: str) -> None:
    """Delete half-written checkpoint files left by a process killed while saving."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".tmp-") and name.endswith(".part"):
                os.remove(os.path.join(directory, name))


def fix_cublas_workspace() -> None:
    """Let deterministic training (the Trainer's ``deterministic=True``) use cuBLAS: without a
    fixed workspace, PyTorch raises at the first CUDA matrix product. cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` when a process first uses it; a value already set is kept."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class RunFolderCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with its state's paths stored relative to its folder.

    Lightning records ``best_model_path`` (and the other paths) as absolute paths in
    ``last.ckpt`` and, when the folder differs on resume, drops the best score: a run folder
    that was moved or copied would then read ``best.ckpt`` at the old path and let the first
    resumed epoch replace the run's best checkpoint whatever its bound. Here each path is kept
    as its name in the folder; an absolute path from an older checkpoint is read as the file of
    that name in this folder (where a run folder moved whole keeps it), and the score is kept.
    """

    def state_dict(self) -> dict:
        state = super().state_dict()
        return {
            **state,
            "dirpath": ".",
            **{key: self._relative(state[key]) for key in _PATH_KEYS},
            "best_k_models": {self._relative(path): score for path, score in state["best_k_models"].items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        state = {
            **state_dict,
            "dirpath": self.dirpath,
            **{key: self._here(state_dict.get(key, "")) for key in _PATH_KEYS},
            "best_k_models": {self._here(path): score for path, score in state_dict.get("best_k_models", {}).items()},
        }
        super().load_state_dict(state)

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.dirpath) if path and self.dirpath else path

    def _here(self, path: str) -> str:
        if not path or not self.dirpath:
            return path
        return os.path.join(self.dirpath, os.path.basename(path) if os.path.isabs(path) else path)


# The path-valued entries of ModelCheckpoint's state.
_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")
