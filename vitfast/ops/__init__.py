"""One public function per fused op. Each validates its inputs, then runs the Triton kernel
(compiled on CUDA, interpreted on CPU with ``TRITON_INTERPRET=1``) or the PyTorch fallback."""
from .layer_norm import layer_norm

__all__ = ["layer_norm"]
