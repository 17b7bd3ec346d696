"""MergeVQ: a visual tokenizer that merges ViT tokens, quantizes them lookup-free and recovers the full grid."""

__version__ = "0.1.0"
