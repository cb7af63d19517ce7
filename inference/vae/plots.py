"""PNG figures for a trained VAE: reconstructions, prior samples, latent scatter, traversals,
ELBO curves (matplotlib, Agg backend; every function writes one file and returns its path)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = [
    "plot_reconstructions",
    "plot_prior_samples",
    "plot_latent_scatter",
    "plot_latent_traversals",
    "plot_elbo_curves",
    "save_all_figures",
]


def _grid(
    images: torch.Tensor, rows: int, columns: int, path: str, *, title: str, row_labels: Optional[Sequence[str]] = None
) -> str:
    """Draw ``rows x columns`` images (``(rows*columns, C, H, W)``, values in [0, 1])."""
    images = images.detach().cpu().float()
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index].mean(0), cmap="gray", vmin=0, vmax=1)
    if row_labels:
        for row, label in enumerate(row_labels):
            axes[row, 0].set_title(label, fontsize=7, loc="left")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _to_unit(vae, images: torch.Tensor) -> torch.Tensor:
    return images / (vae.model.num_levels - 1)


def plot_reconstructions(vae, x: torch.Tensor, path: str, *, num_images: int = 10) -> str:
    """Top row: data ``x[:num_images]``; bottom row: decoder means at ``z ~ q(z|x)``."""
    x = x[:num_images]
    reconstruction = vae.reconstruct(x)
    return _grid(
        torch.cat([_to_unit(vae, x), _to_unit(vae, reconstruction)]),
        2,
        len(x),
        path,
        title="data (top) and reconstructions (bottom)",
    )


def plot_prior_samples(vae, path: str, *, num_images: int = 64) -> str:
    """Decoder means at ``num_images`` draws from the prior."""
    columns = 8
    samples = _to_unit(vae, vae.sample_prior(num_images))
    return _grid(samples, (num_images + columns - 1) // columns, columns, path, title="decoder means at prior samples")


@torch.no_grad()
def plot_latent_scatter(vae, x: torch.Tensor, labels: torch.Tensor, path: str) -> str:
    """Posterior means of ``x`` in 2-D (first two PCA components when ``D > 2``) by class."""
    means = vae.guide.mean(x).cpu().float()
    axis_names = ("z1", "z2")
    if means.shape[1] > 2:
        from sklearn.decomposition import PCA

        means = torch.from_numpy(PCA(n_components=2).fit_transform(means.numpy()))
        axis_names = ("PC 1 of E[z|x]", "PC 2 of E[z|x]")
    elif means.shape[1] == 1:
        means = torch.cat([means, torch.zeros_like(means)], 1)
    figure, axis = plt.subplots(figsize=(5, 4.5))
    points = axis.scatter(means[:, 0].numpy(), means[:, 1].numpy(), c=labels.cpu().numpy(), cmap="tab10", s=4)
    figure.colorbar(points, ax=axis, label="class")
    axis.set_xlabel(axis_names[0])
    axis.set_ylabel(axis_names[1])
    axis.set_title("latent posterior means by class")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@torch.no_grad()
def plot_latent_traversals(
    vae,
    x: torch.Tensor,
    path: str,
    *,
    dimensions: Optional[Sequence[int]] = None,
    num_steps: int = 9,
    span: float = 3.0,
) -> str:
    """Vary one latent coordinate at a time over ``[-span, span]`` around ``E[z | x[0]]``.

    ``dimensions`` defaults to the (up to 8) dimensions whose posterior means vary most over
    ``x`` (the most active units).
    """
    means = vae.guide.mean(x)
    if dimensions is None:
        dimensions = means.var(0).argsort(descending=True)[:8].tolist()
    anchor = means[0]
    grid = anchor.repeat(len(dimensions), num_steps, 1)
    values = torch.linspace(-span, span, num_steps, dtype=anchor.dtype, device=anchor.device)
    for row, dimension in enumerate(dimensions):
        grid[row, :, dimension] = values
    images = _to_unit(vae, vae.decode_mean(grid.reshape(-1, anchor.shape[-1])))
    return _grid(
        images,
        len(dimensions),
        num_steps,
        path,
        title=f"traversals over [-{span}, {span}]",
        row_labels=[f"z{d}" for d in dimensions],
    )


def plot_elbo_curves(rows: Sequence[dict], path: str) -> str:
    """Training and validation ELBO per epoch from :func:`~vilab.inference.vae.training.read_metrics`."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("train/elbo", "train ELBO"),
        ("val/elbo", "validation ELBO"),
        ("train/iwae", "train IWAE bound"),
    ):
        points = [(row["epoch"], row[key]) for row in rows if key in row]
        if points:
            epochs, values = zip(*points)
            axis.plot([e + 1 for e in epochs], values, marker="o", label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel("nats per image")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_all_figures(
    vae, x: torch.Tensor, labels: torch.Tensor, out_dir: str, *, metrics_rows: Sequence[dict] = ()
) -> dict[str, str]:
    """Write every figure into ``out_dir``; return ``{name: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "reconstructions": plot_reconstructions(vae, x, os.path.join(out_dir, "reconstructions.png")),
        "prior_samples": plot_prior_samples(vae, os.path.join(out_dir, "prior_samples.png")),
        "latent_scatter": plot_latent_scatter(vae, x, labels, os.path.join(out_dir, "latent_scatter.png")),
        "latent_traversals": plot_latent_traversals(vae, x, os.path.join(out_dir, "latent_traversals.png")),
    }
    if metrics_rows:
        paths["elbo_curves"] = plot_elbo_curves(metrics_rows, os.path.join(out_dir, "elbo_curves.png"))
    return paths
