"""Reusable layers: product quantizer, interaction scorers, sequence encoders, token heads."""
from .quantizer import ProductQuantizer
from .interaction import InteractionScorer, INTERACTIONS
from .sequence_encoders import GRUEncoder, SelfAttentionEncoder
from .token_heads import InterestHeads, TokenHeads, HEAD_TYPES

__all__ = ["ProductQuantizer", "InteractionScorer", "INTERACTIONS", "GRUEncoder", "SelfAttentionEncoder",
           "TokenHeads", "InterestHeads", "HEAD_TYPES"]
