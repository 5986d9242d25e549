"""A reference transformer classifier: MNIST-1D read as a sequence of patches."""

from __future__ import annotations

import torch
from torch import nn


class MNIST1DTransformer(nn.Module):
    """A pre-norm transformer encoder over the signal cut into ``length / patch`` patches (tokens).

    Each patch is embedded by a linear layer, plus a learned position embedding (``nn.Embedding``); ``layers``
    ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention``, GELU MLP, LayerNorm) follow, then a final
    LayerNorm and a linear head over all tokens' features (flattened: a reshape, which the integer simulation
    carries, where mean pooling would be a float op). At the defaults (dim 32, 4 heads, 2 blocks, MLP 64) it has
    about 21k parameters, the quantizable ones in 14 linear layers (the patch embedding, six per block with the
    attention unpacked, the head) and one embedding.

    Input: ``(N, length)`` or ``(N, 1, length)`` signals; output: ``(N, num_classes)`` logits.

    >>> from lightning_hessian.quant import quantizable_layers, unpack_attention
    >>> model = MNIST1DTransformer()
    >>> model(torch.randn(8, 40)).shape, sum(p.numel() for p in model.parameters())
    (torch.Size([8, 10]), 20842)
    >>> layers = quantizable_layers(unpack_attention(model))
    >>> len(layers), layers[:3]
    (15, ['embed', 'position', 'encoder.layers.0.self_attn.q_proj'])
    """

    def __init__(self, length: int = 40, patch: int = 4, dim: int = 32, heads: int = 4, layers: int = 2,
                 mlp: int = 64, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if length % patch:
            raise ValueError(f"patch={patch} must divide length={length}")
        self.patch, self.tokens = patch, length // patch
        self.embed = nn.Linear(patch, dim)
        self.position = nn.Embedding(self.tokens, dim)
        block = nn.TransformerEncoderLayer(dim, heads, mlp, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(self.tokens * dim, num_classes)
        self.register_buffer("positions", torch.arange(self.tokens), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], self.tokens, self.patch)) + self.position(self.positions)
        return self.head(self.norm(self.encoder(tokens)).flatten(1))
