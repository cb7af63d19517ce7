"""The meanfield fit of the Normal-Normal model that several engine tests share."""

from vilab.inference import fit_svi
from vilab.models import conjugate

__all__ = ["fit_normal_normal"]


def fit_normal_normal(x, **options):
    """``fit_svi`` of ``conjugate.normal_normal`` (20 points ``x``) with meanfield, 2000 steps at
    lr 0.05 and no early stop; ``options`` add to or override those."""
    settings = dict(num_steps=2000, lr=0.05, lr_decay=0.01, early_stop=False, progress=False)
    return fit_svi(conjugate.normal_normal, "meanfield", 20, x, **{**settings, **options})
