"""What runs a traced graph: the virtual machine (vm.c), Inductor's fused kernels and their loader."""

__all__: list[str] = []
