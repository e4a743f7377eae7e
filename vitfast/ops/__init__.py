"""One public function per fused op. Each validates its inputs, then runs the Triton kernel
(compiled on CUDA, interpreted on CPU with ``TRITON_INTERPRET=1``) or the PyTorch fallback."""
from .attention import attention, attention_qkv
from .gated_linear import gated_linear
from .layer_norm import layer_norm
from .linear import linear, mlp
from .patch_embed import patch_embed

__all__ = ["attention", "attention_qkv", "gated_linear", "layer_norm", "linear", "mlp", "patch_embed"]
