"""BERT4Rec baseline encoder (Sun et al.; the setting of REFERENCE.md section 12).

A bidirectional post-LN Transformer as in BERT: LayerNorm and dropout on the
input embeddings, then per layer x = LN(x + Drop(Attn(x))) and
x = LN(x + Drop(W2 GELU(W1 x))). Every position attends to every non-padding
position of its row (ids != 0), whatever the valid prefix `seq_offsets`
describes; the [MASK] token is an ordinary non-zero id here.

Written on F.scaled_dot_product_attention rather than nn.TransformerEncoder,
whose nested-tensor fast path syncs with the host, and so that the mask can
be built once per forward for all layers.
"""

from __future__ import annotations

import gin
import torch
import torch.nn.functional as F
from torch import nn

from generative_recommenders.config import ConfigError, check_positive, check_rate
from generative_recommenders.modeling.embeddings import truncated_normal_
from ops.jagged import dense_to_jagged

_LN_EPS = 1e-12  # BERT's layer-norm epsilon
_INIT_STD = 0.02  # BERT's initializer_range


def attention_bias(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, N, N) additive bias: 0 where query i may see key j, -inf elsewhere.

    Keys are the non-padding positions of the row; each query also sees
    itself, which changes nothing for valid queries but keeps a padding query
    (or a row that is all padding) from a softmax over no key, whose NaN would
    reach the weight gradients through 0 * NaN.
    """
    b, n = ids.shape
    # Rows of a multiple of 8 elements, then sliced: the memory-efficient SDPA
    # kernel needs aligned bias rows and would otherwise copy the bias.
    width = -(-n // 8) * 8
    keys = F.pad(ids != 0, (0, width - n))
    allowed = keys[:, None, None, :] | torch.eye(n, width, dtype=torch.bool, device=ids.device)
    bias = torch.zeros(b, 1, n, width, dtype=dtype, device=ids.device)
    return bias.masked_fill(~allowed, float("-inf"))[..., :n]


class BERTLayer(nn.Module):
    """One post-LN Transformer encoder layer with GELU feed-forward, as in BERT."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden_dim: int, dropout_rate: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.ffn_in = nn.Linear(dim, ffn_hidden_dim)
        self.ffn_out = nn.Linear(ffn_hidden_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.dropout = nn.Dropout(dropout_rate)

    def attend(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Multi-head softmax attention; dropout on the attention probabilities as BERT."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout_rate if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return self.attn_out(o.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attend(x, bias)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


@gin.configurable("bert4rec_encoder")
class BERT4RecEncoder(nn.Module):
    """Bidirectional Transformer over the non-padding positions of each row."""

    CAUSAL = False  # trained as a cloze task: output i predicts the item at i
    USES_POSITIONS = True  # attention alone is order-blind

    def __init__(
        self,
        dim: int,
        max_seq_len: int,  # part of the encoder interface; positions come from the input module
        num_blocks: int = 2,
        num_heads: int = 2,
        ffn_hidden_dim: int = 256,
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive("bert4rec_encoder", num_blocks=num_blocks, num_heads=num_heads, ffn_hidden_dim=ffn_hidden_dim)
        check_rate("bert4rec_encoder", dropout_rate=dropout_rate)
        if dim % num_heads:
            raise ConfigError(f"item_embedding_dim {dim} must be divisible by bert4rec_encoder.num_heads {num_heads}")
        self.input_norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.input_dropout = nn.Dropout(dropout_rate)
        self.layers = nn.ModuleList(
            BERTLayer(dim, num_heads, ffn_hidden_dim, dropout_rate) for _ in range(num_blocks)
        )
        self.apply(_bert_init)

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, seq_offsets: torch.Tensor, total: int,
        timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """x: (B, N, D) padded input; returns the (total, D) jagged outputs of valid positions."""
        bias = attention_bias(ids, x.dtype)
        x = self.input_dropout(self.input_norm(x))
        for layer in self.layers:
            x = layer(x, bias)
        return dense_to_jagged(x, seq_offsets, total)


def _bert_init(module: nn.Module) -> None:
    """BERT's init: Linear weights N(0, 0.02) truncated at 2 std (TF BERT), zero biases.

    LayerNorms keep PyTorch's unit scale and zero shift, which is BERT's too.
    """
    if isinstance(module, nn.Linear):
        truncated_normal_(module.weight.data, std=_INIT_STD)
        nn.init.zeros_(module.bias)
