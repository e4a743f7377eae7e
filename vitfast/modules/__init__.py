"""Drop-in ``nn.Module``s running on vitfast's ops, with the parameters and ``state_dict`` of the
modules they replace. The stand-ins for timm, torchvision and Hugging Face classes are made by
``vitfast.optimize`` (``vitfast/convert/``), as subclasses of the classes they replace."""
from .encoder import FastTransformerEncoder, FastTransformerEncoderLayer
from .layer_norm import LayerNorm
from .mlp import Mlp
from .patch_embed import PatchConv2d, PatchEmbedding, PatchEmbeddingStage
from .vit import FastVisionTransformer

__all__ = [
    "FastTransformerEncoder", "FastTransformerEncoderLayer", "FastVisionTransformer", "LayerNorm", "Mlp",
    "PatchConv2d", "PatchEmbedding", "PatchEmbeddingStage",
]
