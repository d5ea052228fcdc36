"""Compute kernels for the model families (GLA: PyTorch reference, own Triton, fla dispatch)."""
