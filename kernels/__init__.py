"""Triton kernels and their launchers (installed as ``vitfast.kernels``).

One file per fused op. Only ``@triton.jit`` code and thin launchers that compute grids and strides
live here: no ``nn.Module``, no autograd, no input validation beyond what a launcher assumes (the
ops in ``vitfast.ops`` validate before they call in).
"""
