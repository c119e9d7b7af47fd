"""All-to-all interaction scorers of SparCode (Eq. 9 and the list of Sec. 4.3.1).

One (quantized) user token q [D] is scored against the K_c tokens of an item T [K_c, D]:

    dot         S = sum_j <q, T_j>                        (parameter-free)
    maxsim      S = max_j <q, T_j>                         (ColBERT, parameter-free)
    crossnet    S = w^T CrossNet([q; T_1; ...; T_Kc])       (DCN cross layers, ``crossnet_layers``)
    dnn         S = MLP([q; T_1; ...; T_Kc])
    innerp_dnn  S = MLP([q * T_1; ...; q * T_Kc])           (Eq. 9, default)

Shapes. ``forward(query [..., D], items [..., K_c, D]) -> score [...]``: the leading axes of ``query``
(``query.shape[:-1]``) and of ``items`` (``items.shape[:-2]``) are broadcast against each other. Typical
uses:
    training:  query [B, 1, K_u, D]  with items [B, C, 1, K_c, D]  -> S [B, C, K_u]
    serving:   query [n_keys, 1, D]  with items [1, n_items, K_c, D] -> S [n_keys, n_items]
Items are thus never copied K_u times before their own projection: ``dot`` sums the item tokens first,
``dnn`` projects the query and the items separately with the two halves of its first layer and adds
the results by broadcasting. ``maxsim``, ``crossnet`` and ``innerp_dnn`` need the pairwise tensor
([..., K_c, D] or [..., (1 + K_c) D]) by definition.

Stop-gradient. The sg[] of Eq. 9 is there "to avoid affecting the parameters of codebooks". In this
library the codebooks are buffers updated by EMA, outside autograd, so no loss can reach them whatever
the scorer does. The scorer therefore never detaches the query: the quantizer's ``gradient_mode``
alone decides whether the matching loss reaches the tokenizer ("straight_through") or not
("commitment_only" already returns a detached vector, the literal reading of Eq. 9).
"""
import torch
from torch import nn
from fuxictr.pytorch.layers import CrossNet, MLP_Block
from fuxictr.pytorch.torch_utils import get_activation

INTERACTIONS = ("dot", "maxsim", "crossnet", "dnn", "innerp_dnn")
PAIR_BUDGET = 1 << 24     # floats of one all_pairs block: pairs x (input width + hidden units)
PAIRWISE_INTERACTIONS = ("dot", "maxsim")   # all query x item scores by matrix products (pairwise)


def _check_activation(activation):
    """ValueError for an activation name fuxictr cannot build."""
    if not isinstance(activation, str):
        raise ValueError(f"activation must be a string such as 'ReLU', got {activation!r}")
    if activation.lower() in ("prelu", "dice"):
        raise ValueError(f"activation={activation!r} is not supported here; use e.g. 'ReLU', 'Tanh', 'GELU'")
    try:
        get_activation(activation)
    except (AttributeError, TypeError) as error:
        raise ValueError(f"unknown activation {activation!r}: expected a torch.nn activation name "
                         f"such as 'ReLU'") from error


class InteractionScorer(nn.Module):
    """Score between one user token and the K_c tokens of an item.

    Args:
        token_dim: D, size of every token.
        num_item_tokens: K_c, tokens per item.
        interaction: "dot" | "maxsim" | "crossnet" | "dnn" | "innerp_dnn" (default, Eq. 9).
        hidden_units: hidden layer sizes of the MLP ("dnn", "innerp_dnn"); None -> [256, 256, 256]
            (paper's setting). The MLP ends with a Linear layer to one output.
        activation: hidden activation name for the MLP (torch.nn name). Default "ReLU".
        dropout: dropout rate after every hidden layer of the MLP. Default 0.0.
        crossnet_layers: number of cross layers for "crossnet". Default 3 (paper).
    """

    def __init__(self,
                 token_dim=64,
                 num_item_tokens=1,
                 interaction="innerp_dnn",
                 hidden_units=None,
                 activation="ReLU",
                 dropout=0.0,
                 crossnet_layers=3):
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"InteractionScorer: interaction={interaction!r}, expected one of {INTERACTIONS}")
        for name, value in (("token_dim", token_dim), ("num_item_tokens", num_item_tokens),
                            ("crossnet_layers", crossnet_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InteractionScorer: {name} must be a positive int, got {value!r}")
        hidden_units = [256, 256, 256] if hidden_units is None else list(hidden_units)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_units):
            raise ValueError(f"InteractionScorer: hidden_units must be positive ints, got {hidden_units!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"InteractionScorer: dropout must be in [0, 1), got {dropout!r}")
        _check_activation(activation)
        self.token_dim = token_dim
        self.num_item_tokens = num_item_tokens
        self.interaction = interaction
        self.pair_width = (num_item_tokens + 1) * token_dim + sum(hidden_units)   # floats per (query, item) pair

        items_dim = num_item_tokens * token_dim
        if interaction == "innerp_dnn":
            self.mlp = MLP_Block(items_dim, hidden_units=hidden_units, hidden_activations=activation,
                                 output_dim=1, dropout_rates=dropout)
        elif interaction == "dnn":
            # First layer W [q; T] = W_q q + W_T T, computed on the un-broadcast inputs.
            first_dim = hidden_units[0] if hidden_units else 1
            self.query_proj = nn.Linear(token_dim, first_dim)
            self.items_proj = nn.Linear(items_dim, first_dim, bias=False)
            if hidden_units:
                self.first_activation = get_activation(activation)
                self.first_dropout = nn.Dropout(dropout)
                self.mlp = MLP_Block(first_dim, hidden_units=hidden_units[1:], hidden_activations=activation,
                                     output_dim=1, dropout_rates=dropout)
            else:
                self.first_activation, self.first_dropout, self.mlp = nn.Identity(), nn.Identity(), nn.Identity()
        elif interaction == "crossnet":
            self.crossnet = CrossNet(token_dim + items_dim, crossnet_layers)
            self.output_layer = nn.Linear(token_dim + items_dim, 1)

    def forward(self, query, items):
        """query [..., D], items [..., K_c, D] (leading axes broadcastable) -> score [...]."""
        if query.shape[-1] != self.token_dim or items.shape[-1] != self.token_dim:
            raise ValueError(f"InteractionScorer: token sizes query={query.shape[-1]}, "
                             f"items={items.shape[-1]}, expected token_dim={self.token_dim}")
        if items.dim() < 2 or items.shape[-2] != self.num_item_tokens:
            raise ValueError(f"InteractionScorer: items must be [..., K_c={self.num_item_tokens}, "
                             f"{self.token_dim}], got shape {tuple(items.shape)}")
        if self.interaction == "dot":
            return (query * items.sum(dim=-2)).sum(dim=-1)
        if self.interaction == "maxsim":
            return (query.unsqueeze(-2) * items).sum(dim=-1).amax(dim=-1)
        if self.interaction == "innerp_dnn":
            products = (query.unsqueeze(-2) * items).flatten(-2)                       # [..., K_c * D]
            return self.mlp(products).squeeze(-1)
        items_flat = items.flatten(-2)                                                 # [..., K_c * D]
        if self.interaction == "dnn":
            hidden = self.query_proj(query) + self.items_proj(items_flat)             # [..., H_1]
            return self.mlp(self.first_dropout(self.first_activation(hidden))).squeeze(-1)
        # crossnet
        shape = torch.broadcast_shapes(query.shape[:-1], items.shape[:-2])
        inputs = torch.cat([query.expand(*shape, -1), items_flat.expand(*shape, -1)], dim=-1)
        return self.output_layer(self.crossnet(inputs)).squeeze(-1)

    def pairwise(self, queries, items):
        """Every query against every item for `dot` and `maxsim`: queries [Q, D], items [C, K_c, D] -> [Q, C].

        The same scores as forward(queries[:, None], items[None]) by matrix products, without the
        [Q, C, D] broadcast product (training scores B * K_u queries against every sampled item)."""
        if self.interaction not in PAIRWISE_INTERACTIONS:
            raise ValueError(f"InteractionScorer.pairwise: interaction={self.interaction!r}; expected one of "
                             f"{list(PAIRWISE_INTERACTIONS)} (use forward for the others)")
        if self.interaction == "dot":
            return queries @ items.sum(dim=-2).t()                                     # [Q, C]
        return torch.einsum("qd,ckd->qck", queries, items).amax(dim=-1)               # [Q, C]

    def all_pairs(self, queries, items, item_chunk=4096):
        """Every query against every item for any interaction: queries [Q, D], items [C, K_c, D] -> [Q, C].

        `dot` / `maxsim` by matrix products (pairwise); the MLP scorers in blocks of queries x items that keep
        one block's activations within PAIR_BUDGET floats."""
        columns = []
        for start in range(0, items.shape[0], item_chunk):
            chunk = items[start:start + item_chunk]                                     # [c, K_c, D]
            if self.interaction in PAIRWISE_INTERACTIONS:
                columns.append(self.pairwise(queries, chunk))                           # [Q, c]
                continue
            rows = max(1, PAIR_BUDGET // (chunk.shape[0] * self.pair_width))
            columns.append(torch.cat([self(queries[q:q + rows].unsqueeze(1), chunk.unsqueeze(0))
                                      for q in range(0, queries.shape[0], rows)], dim=0))  # [Q, c]
        return torch.cat(columns, dim=1) if columns else queries.new_zeros(queries.shape[0], 0)

    def extra_repr(self):
        return (f"interaction={self.interaction!r}, token_dim={self.token_dim}, "
                f"num_item_tokens={self.num_item_tokens}")
