"""The compile engine: traced steps of NUTS and SVI run as fx code, on a small virtual machine or as fused Inductor kernels, on public PyTorch APIs except behind :mod:`~vilab.inference.engine.backends.torch_internals` (docs/design/engine.md)."""

__all__: list[str] = []
