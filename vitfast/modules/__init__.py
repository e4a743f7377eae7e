"""Drop-in ``nn.Module``s running on vitfast's ops, with the parameters and ``state_dict`` of the
modules they replace."""
from .encoder import FastTransformerEncoder, FastTransformerEncoderLayer
from .families import HFViTEmbeddings, HFViTLayer, PatchConv2d, TimmBlock, TimmPatchEmbed, TorchvisionEncoderBlock
from .layer_norm import LayerNorm
from .mlp import Mlp
from .patch_embed import PatchEmbedding, PatchEmbeddingStage
from .vit import FastVisionTransformer

__all__ = [
    "FastTransformerEncoder", "FastTransformerEncoderLayer", "FastVisionTransformer", "HFViTEmbeddings",
    "HFViTLayer", "LayerNorm", "Mlp", "PatchConv2d", "PatchEmbedding", "PatchEmbeddingStage", "TimmBlock",
    "TimmPatchEmbed", "TorchvisionEncoderBlock",
]
