"""Fused Triton kernels of vits_fast (installed as ``vits_fast.kernels``).

Each module is one kernel family: header comment, ``@triton.jit`` kernels, launcher, and the
``torch.library`` registration. Nothing here is imported unless a fused path is taken.
"""
