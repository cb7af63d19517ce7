r"""Sequence data for sequential VAEs: images read row by row, and a simulated pendulum.

Every loader returns a :class:`SequenceData` with ``(N, T, F)`` float splits.

* :func:`load_image_rows`: Fashion-MNIST (or any :func:`vilab.datasets.load_dataset` set)
  as ``T = 28`` steps of ``F = 28`` binary pixels, binarized once with a fixed seed.
* :func:`simulate_pendulum`: a damped nonlinear pendulum with process noise,

  .. math::

      \theta_{t+1} = \theta_t + \Delta\,\omega_t, \qquad
      \omega_{t+1} = \omega_t - \Delta\,(g \sin\theta_t + c\,\omega_t) + \sigma_p \epsilon_t,
      \qquad x_t = (\sin\theta_t, \cos\theta_t) + \sigma_o \eta_t,

  observed only through the noisy position on the unit circle (``F = 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["SequenceData", "image_rows", "load_image_rows", "simulate_pendulum"]


@dataclass
class SequenceData:
    """Train/validation/test sequences of shape ``(N, T, F)``.

    Attributes:
        name: Data-set name.
        train, validation, test: ``(N, T, F)`` float tensors.
        likelihood: ``"bernoulli"`` (0/1 features) or ``"normal"``.
        train_labels, test_labels: ``(N,)`` labels when the source has them, else ``None``.
        latent_states: ``(N_test, T, S)`` true states of the test split (simulations only).
    """

    name: str
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    likelihood: str
    train_labels: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None
    latent_states: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return self.train.shape[1]

    @property
    def num_features(self) -> int:
        return self.train.shape[2]


def image_rows(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` images -> ``(N, H, W)`` sequences of ``H`` rows of ``W`` pixels."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images: expected shape (N, 1, H, W); got {tuple(images.shape)}")
    return images[:, 0]


def load_image_rows(
    name: str = "fashion-mnist",
    *,
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    num_validation: int = 1000,
    data_dir: Optional[str] = None,
    seed: int = 0,
) -> SequenceData:
    """Binary images as row sequences (``T = H``, ``F = W``).

    Training images are binarized once with ``seed`` (the image VAEs binarize dynamically;
    a fixed draw keeps sequence batches reproducible here).
    """
    from vilab.datasets import binarize, load_dataset

    data = load_dataset(name, data_dir=data_dir, validation_size=num_validation, seed=seed)
    if data.num_levels != 2:
        raise ValueError(f"name: expected a binary image data set; {name!r} has {data.num_levels} levels")
    data = data.subset(num_train=num_train, num_test=num_test)
    return SequenceData(
        f"{name}-rows",
        image_rows(binarize(data.train, seed=seed + 3)),
        image_rows(data.validation),
        image_rows(data.test),
        "bernoulli",
        data.train_labels,
        data.test_labels,
    )


def simulate_pendulum(
    num_sequences: int = 1200,
    num_steps: int = 50,
    *,
    dt: float = 0.1,
    gravity: float = 9.81,
    damping: float = 0.25,
    process_scale: float = 0.05,
    obs_scale: float = 0.1,
    test_fraction: float = 1 / 6,
    seed: int = 0,
) -> SequenceData:
    r"""Simulate the pendulum of the module docstring; angles start in :math:`U(-\pi, \pi)`,
    velocities in :math:`\mathcal{N}(0, 1)`.

    The last ``test_fraction`` of sequences is the test split and as many again validation.
    """
    if num_sequences < 6 or num_steps < 2:
        raise ValueError(f"num_sequences, num_steps: expected >= 6 and >= 2; got {num_sequences}, {num_steps}")
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    theta = (torch.rand(num_sequences, generator=generator) * 2 - 1) * torch.pi
    omega = torch.randn(num_sequences, generator=generator)
    states = []
    for _ in range(num_steps):
        states.append(torch.stack([theta, omega], -1))
        theta, omega = (
            theta + dt * omega,
            omega
            - dt * (gravity * torch.sin(theta) + damping * omega)
            + process_scale * torch.randn(num_sequences, generator=generator),
        )
    states = torch.stack(states, 1)
    observed = torch.stack([torch.sin(states[..., 0]), torch.cos(states[..., 0])], -1)
    observed = observed + obs_scale * torch.randn(observed.shape, generator=generator)
    num_test = max(1, int(num_sequences * test_fraction))
    train_end = num_sequences - 2 * num_test
    observed, states = observed.to(dtype), states.to(dtype)
    return SequenceData(
        "pendulum",
        observed[:train_end],
        observed[train_end:-num_test],
        observed[-num_test:],
        "normal",
        latent_states=states[-num_test:],
    )
