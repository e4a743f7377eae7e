"""Drop-in ``nn.Module``s running on vitfast's ops, with the parameters and ``state_dict`` of the
modules they replace. The stand-ins for timm, torchvision, Hugging Face and open_clip classes are made by
``vitfast.optimize`` (``vitfast/convert/``), as subclasses of the classes they replace."""
from .encoder import FastTransformerEncoder, FastTransformerEncoderLayer
from .layer_norm import LayerNorm
from .linear import Linear
from .mlp import Mlp
from .multihead_attention import MultiheadAttention
from .patch_embed import PatchConv2d, PatchEmbedding, PatchEmbeddingStage
from .vit import FastVisionTransformer

__all__ = [
    "FastTransformerEncoder", "FastTransformerEncoderLayer", "FastVisionTransformer", "LayerNorm", "Linear", "Mlp",
    "MultiheadAttention", "PatchConv2d", "PatchEmbedding", "PatchEmbeddingStage",
]
