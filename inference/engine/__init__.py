"""The compile engine: traced steps of NUTS and SVI run by Static Runtime, a small virtual machine or fused Inductor kernels (docs/design/engine.md)."""

__all__: list[str] = []
