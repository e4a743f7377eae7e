"""vitfast: Vision Transformers on hand-written Triton kernels.

>>> import vitfast
>>> y = vitfast.ops.layer_norm(torch.randn(4, 768), torch.ones(768), torch.zeros(768))
"""
from . import ops, modules, runtime

__version__ = "0.1.0"
__all__ = ["ops", "modules", "runtime", "__version__"]
