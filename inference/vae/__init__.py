"""VAEs: the training loop, evaluation, objectives, checkpoints and run directories."""

__all__: list[str] = []
