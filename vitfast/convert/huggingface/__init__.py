"""Hugging Face transformers, matched by exact class: the image embeddings (``embeddings.py``) and the
pre-norm encoder layers (``layers.py``) of ViT, DeiT, CLIP, SigLIP (SigLIP 2's layers), DINOv2 (and
with registers); SigLIP's attention-pooling head (``pooling.py``); what a call asks beyond the hidden
states (``capture.py``)."""
from .embeddings import RULES as _EMBEDDINGS
from .layers import RULES as _LAYERS
from .pooling import RULES as _POOLING

RULES = [*_EMBEDDINGS, *_LAYERS, *_POOLING]
