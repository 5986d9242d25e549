"""Attention whose projections are layers, so quantization, layer costs and sensitivities can see them.

``nn.MultiheadAttention`` applies its q/k/v projections and ``out_proj`` inside ``F.multi_head_attention_forward``,
on the packed ``in_proj_weight`` and on ``out_proj.weight`` directly: no forward hook fires for them, and a quantized
layer swapped in for ``out_proj`` is never called, so swapping modules would leave them in float without a word.
:class:`MultiheadAttention` computes the same function with four ``nn.Linear`` layers called as modules (``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``) and ``F.scaled_dot_product_attention``.

``nn.TransformerEncoderLayer`` in eval mode without gradients (batch-first, even head count, ...) takes a fused
kernel, ``torch._transformer_encoder_layer_fwd``, that reads ``linear1.weight`` and the attention weights itself, so
swapped quantized layers would be bypassed just as silently. :class:`TransformerEncoderLayer` is that layer without
the fused path, and ``nn.TransformerEncoder``'s nested-tensor path is switched off.

:func:`unpack_attention` makes both changes in a copy of a model; ``quantize_model`` and ``HAWQModule`` apply it, so
the layer names of an attention module ``attn`` are ``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj`` and
``attn.out_proj``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (same arguments, inputs and outputs) with its projections as ``nn.Linear`` layers.

    Supports batched and unbatched inputs, ``batch_first``, ``kdim``/``vdim``, ``bias``, boolean or additive
    ``attn_mask`` (2-D, or 3-D per batch and head) and ``key_padding_mask``, attention dropout, and
    ``need_weights`` (the head-averaged or per-head weights); ``add_bias_kv`` and ``add_zero_attn`` are not
    supported (:meth:`from_torch` refuses them). With ``need_weights=False`` the attention is one
    ``F.scaled_dot_product_attention`` call.

    >>> torch_attention = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> attention = MultiheadAttention.from_torch(torch_attention)
    >>> [name for name, _ in attention.named_children()]
    ['q_proj', 'k_proj', 'v_proj', 'out_proj']
    >>> x = torch.randn(3, 5, 8)
    >>> out, weights = attention(x, x, x)
    >>> torch.allclose(out, torch_attention(x, x, x)[0], atol=1e-6), weights.shape
    (True, torch.Size([3, 5, 5]))
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        factory = {"device": device, "dtype": dtype, "bias": bias}
        self.q_proj = nn.Linear(embed_dim, embed_dim, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **factory)

    @classmethod
    @torch.no_grad()
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """The same attention as ``mha`` (its weights copied), in its train/eval mode."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported: its "
                             "projections cannot be unpacked into layers")
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias, mha.kdim, mha.vdim, mha.batch_first,
                  device=weights[0].device, dtype=weights[0].dtype)
        biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
        for layer, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if bias:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(n, length, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, source, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(n, source, h, d).transpose(1, 2)
        mask = self._additive_mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = (F.dropout(weights, p) if p > 0 else weights) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _additive_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, length: int,
                       source: int, dtype: torch.dtype) -> Tensor | None:
        """The masks as one additive float mask broadcasting over ``(N, heads, L, S)`` (``-inf`` where a boolean mask
        is ``True``, as ``nn.MultiheadAttention`` reads them)."""
        def additive(mask: Tensor) -> Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
            return mask.to(dtype)

        total = None
        if attn_mask is not None:
            m = additive(attn_mask)
            total = m.view(1, 1, length, source) if m.dim() == 2 else m.view(n, self.num_heads, length, source)
        if key_padding_mask is not None:
            m = additive(key_padding_mask).view(n, 1, 1, source)
            total = m if total is None else total + m
        return total

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always runs its modules (``self_attn``, ``linear1``, ``linear2``, the
    norms) as modules: no fused inference kernel bypasses swapped layers.

    >>> torch_layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    >>> layer = unpack_attention(torch_layer)
    >>> type(layer).__name__, type(layer.self_attn).__name__
    ('TransformerEncoderLayer', 'MultiheadAttention')
    >>> x = torch.randn(3, 5, 8)
    >>> with torch.no_grad():  # the same function as the fused layer
    ...     torch.allclose(layer(x), torch_layer(x), atol=1e-5)
    True
    """

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


def has_packed_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an ``nn.MultiheadAttention`` or a fused-path transformer layer to unpack."""
    return any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoder)) or type(m) is nn.TransformerEncoderLayer
               for m in model.modules())


def unpack_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing the same function with every attention projection a layer (``model`` itself when
    there is nothing to unpack).

    Every ``nn.MultiheadAttention`` becomes :class:`MultiheadAttention`, every ``nn.TransformerEncoderLayer``
    :class:`TransformerEncoderLayer` (no fused fast path) and every ``nn.TransformerEncoder`` loses its nested-tensor
    fast path. A subclass of ``nn.TransformerEncoderLayer`` that inherits its ``forward`` (with the fused path) is
    refused, naming it.
    """
    if not has_packed_attention(model):
        return model
    for name, m in model.named_modules():
        if (isinstance(m, nn.TransformerEncoderLayer) and type(m) is not nn.TransformerEncoderLayer
                and type(m).forward is nn.TransformerEncoderLayer.forward):
            raise ValueError(f"{name!r} ({type(m).__name__}) inherits nn.TransformerEncoderLayer.forward, whose fused "
                             "inference kernel would bypass quantized layers: override forward, or use "
                             "nn.TransformerEncoderLayer itself")
    model = copy.deepcopy(model)
    if isinstance(model, nn.MultiheadAttention):
        return MultiheadAttention.from_torch(model)
    unpacked: dict[int, MultiheadAttention] = {}  # one module shared at several paths stays one module
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, nn.MultiheadAttention):
            parent, _, child = name.rpartition(".")
            new = unpacked.setdefault(id(m), MultiheadAttention.from_torch(m))
            setattr(model.get_submodule(parent), child, new)
        elif type(m) is nn.TransformerEncoderLayer:
            m.__class__ = TransformerEncoderLayer
        elif isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return model
