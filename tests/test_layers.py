"""Tests of the interaction scorers, sequence encoders and token heads in model_zoo.layers."""
import pytest
import torch
from torch import nn

from model_zoo.layers import (INTERACTIONS, GRUEncoder, InteractionScorer, InterestHeads, SelfAttentionEncoder,
                              TokenHeads)

B, C, K_U, K_C, D = 3, 4, 2, 3, 8


def _scorer(interaction):
    torch.manual_seed(0)
    return InteractionScorer(token_dim=D, num_item_tokens=K_C, interaction=interaction,
                             hidden_units=[16, 8], dropout=0.0)


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_interaction_forward_backward_broadcast(interaction):
    scorer = _scorer(interaction)
    query = torch.randn(B, 1, K_U, D, requires_grad=True)
    items = torch.randn(B, C, 1, K_C, D, requires_grad=True)
    scores = scorer(query, items)
    assert scores.shape == (B, C, K_U)
    assert torch.isfinite(scores).all()
    scores.square().sum().backward()
    for name, parameter in scorer.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and float(parameter.grad.abs().sum()) > 0, name
    assert float(query.grad.abs().sum()) > 0 and float(items.grad.abs().sum()) > 0
    # Broadcasting gives the same score as scoring one pair at a time.
    with torch.no_grad():
        for b, c, k in [(0, 0, 0), (2, 3, 1), (1, 2, 0)]:
            single = scorer(query[b, 0, k], items[b, c, 0])
            assert single.shape == ()
            assert torch.allclose(single, scores[b, c, k], atol=1e-5)
    # Serving layout: every key against every item.
    keys, corpus = torch.randn(5, 1, D), torch.randn(1, 7, K_C, D)
    assert scorer(keys, corpus).shape == (5, 7)


def test_parameter_free_interactions_follow_their_formulas():
    query, items = torch.randn(5, D), torch.randn(5, K_C, D)
    pair_products = (query.unsqueeze(1) * items).sum(-1)                            # [5, K_C]
    assert torch.allclose(_scorer("dot")(query, items), pair_products.sum(-1), atol=1e-5)
    assert torch.allclose(_scorer("maxsim")(query, items), pair_products.max(-1).values)
    assert list(_scorer("dot").parameters()) == [] and list(_scorer("maxsim").parameters()) == []


@pytest.mark.parametrize("interaction", ["dot", "maxsim"])
def test_pairwise_equals_broadcast_forward_in_value_and_gradient(interaction):
    scorer = _scorer(interaction)
    queries = torch.randn(6, D, requires_grad=True)
    items = torch.randn(7, K_C, D, requires_grad=True)
    fast = scorer.pairwise(queries, items)                                           # [6, 7]
    slow = scorer(queries[:, None], items[None])                                     # [6, 7]
    assert fast.shape == (6, 7) and torch.allclose(fast, slow, atol=1e-5)
    weights = torch.randn(6, 7)
    fast_grads = torch.autograd.grad((fast * weights).sum(), [items, queries])
    slow_grads = torch.autograd.grad((slow * weights).sum(), [items, queries])
    for got, expected in zip(fast_grads, slow_grads):
        assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="pairwise.*innerp_dnn"):
        _scorer("innerp_dnn").pairwise(queries, items)


def test_dnn_equals_mlp_on_concatenation():
    scorer = _scorer("dnn")
    query, items = torch.randn(6, D), torch.randn(6, K_C, D)
    concat = torch.cat([query, items.flatten(1)], dim=1)
    first = nn.Linear(D + K_C * D, 16)
    with torch.no_grad():
        first.weight.copy_(torch.cat([scorer.query_proj.weight, scorer.items_proj.weight], dim=1))
        first.bias.copy_(scorer.query_proj.bias)
    expected = scorer.mlp(torch.relu(first(concat))).squeeze(-1)
    assert torch.allclose(scorer(query, items), expected, atol=1e-5)


def test_innerp_dnn_uses_elementwise_products():
    scorer = _scorer("innerp_dnn")
    query, items = torch.randn(6, D), torch.randn(6, K_C, D)
    expected = scorer.mlp((query.unsqueeze(1) * items).flatten(1)).squeeze(-1)
    assert torch.allclose(scorer(query, items), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(interaction="mlp"), "interaction='mlp'"),
    (dict(activation="NoSuchAct"), "unknown activation 'NoSuchAct'"),
    (dict(hidden_units=[16, 0]), "hidden_units must be positive ints"),
    (dict(crossnet_layers=0), "crossnet_layers must be a positive int"),
])
def test_interaction_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InteractionScorer(token_dim=D, num_item_tokens=K_C, **kwargs)


def test_interaction_wrong_item_tokens_raises():
    with pytest.raises(ValueError, match="K_c=3"):
        _scorer("dnn")(torch.randn(2, D), torch.randn(2, 2, D))


# ---------------------------------------------------------------- sequence encoders
def _left_padded(history, seq_len, padding_value):
    """history [n, D] -> seq [1, seq_len, D] with padding on the left, mask [1, seq_len]."""
    n = history.shape[0]
    padding = torch.full((seq_len - n, history.shape[1]), padding_value)
    mask = torch.cat([torch.zeros(seq_len - n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    return torch.cat([padding, history]).unsqueeze(0), mask.unsqueeze(0)


ENCODERS = {
    "gru": lambda: GRUEncoder(input_dim=D, hidden_dim=6, num_layers=2, dropout=0.1),
    "sa": lambda: SelfAttentionEncoder(dim=D, num_layers=2, num_heads=2, dropout=0.1, max_len=12),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_left_padding_does_not_change_outputs(name):
    torch.manual_seed(0)
    encoder = ENCODERS[name]().eval().requires_grad_(False)
    history = torch.randn(3, D)
    seq_a, mask_a = _left_padded(history, 5, 0.0)
    seq_b, mask_b = _left_padded(history, 12, 7.5)                                  # garbage padding
    seq_c, mask_c = history.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool)       # no padding
    out_a, last_a = encoder(seq_a, mask_a)
    out_b, last_b = encoder(seq_b, mask_b)
    out_c, last_c = encoder(seq_c, mask_c)
    assert torch.allclose(last_a, last_b, atol=1e-5) and torch.allclose(last_a, last_c, atol=1e-5)
    assert torch.allclose(out_a[:, -3:], out_b[:, -3:], atol=1e-5)
    assert torch.allclose(out_a[:, -3:], out_c, atol=1e-5)
    assert torch.allclose(last_a, out_a[:, -1])
    assert float(out_b[:, :-3].detach().abs().sum()) == 0.0                                  # padding outputs zero
    # Batched with other lengths (including an empty history) gives the same rows.
    batch = torch.cat([seq_b, torch.randn(2, 12, D)])
    batch_mask = torch.cat([mask_b, torch.ones(1, 12, dtype=torch.bool), torch.zeros(1, 12, dtype=torch.bool)])
    out_batch, last_batch = encoder(batch, batch_mask)
    assert torch.allclose(last_batch[0], last_b[0], atol=1e-5)
    assert float(last_batch[2].abs().sum()) == 0.0 and torch.isfinite(out_batch).all()


def test_gru_matches_plain_gru_on_unpadded_history():
    torch.manual_seed(1)
    encoder = GRUEncoder(input_dim=D, hidden_dim=6).eval()
    history = torch.randn(1, 4, D)
    seq, mask = _left_padded(history[0], 9, -3.0)
    expected_out, expected_hidden = encoder.gru(history)
    out, last = encoder(seq, mask)
    assert torch.allclose(last, expected_hidden[-1], atol=1e-6)
    assert torch.allclose(out[:, -4:], expected_out, atol=1e-6)


def test_gru_rejects_right_padding():
    with pytest.raises(ValueError, match="left padded"):
        GRUEncoder(input_dim=D, hidden_dim=4)(torch.randn(1, 3, D), torch.tensor([[True, True, False]]))


def test_self_attention_is_causal():
    torch.manual_seed(2)
    encoder = SelfAttentionEncoder(dim=D, num_layers=3, num_heads=2, max_len=10).eval()
    seq = torch.randn(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    changed = seq.clone()
    changed[:, 6:] = torch.randn(2, 4, D)                                           # items after t = 5
    out, _ = encoder(seq, mask)
    out_changed, _ = encoder(changed, mask)
    assert torch.allclose(out[:, :6], out_changed[:, :6], atol=1e-6)
    assert not torch.allclose(out[:, 6:], out_changed[:, 6:])
    # Non-causal mode: every position sees the change.
    all_to_all = SelfAttentionEncoder(dim=D, num_layers=1, num_heads=2, max_len=10, causal=False).eval()
    assert not torch.allclose(all_to_all(seq, mask)[0][:, 7 - 1], all_to_all(changed, mask)[0][:, 7 - 1])


def test_self_attention_non_causal_key_padding_and_gradients():
    torch.manual_seed(3)
    encoder = SelfAttentionEncoder(dim=D, num_layers=2, num_heads=1, dropout=0.1, max_len=6, causal=False,
                                   use_positions=False)
    seq = torch.randn(2, 6, D, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True, True, False, True, False, True]])
    out, last = encoder(seq, mask)
    assert out.shape == (2, 6, D) and last.shape == (2, D) and torch.isfinite(out).all()
    (out.square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert float(seq.grad[1, 2].abs().sum()) == 0.0                                 # padding never used
    encoder.eval()
    garbage = seq.detach().clone()
    garbage[1, [2, 4]] = 100.0
    assert torch.allclose(encoder(seq.detach(), mask)[0], encoder(garbage, mask)[0], atol=1e-5)


def test_self_attention_rejects_long_sequences():
    with pytest.raises(ValueError, match="exceeds max_len=4"):
        SelfAttentionEncoder(dim=D, max_len=4)(torch.randn(1, 5, D))
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        SelfAttentionEncoder(dim=D, num_heads=3)


# ---------------------------------------------------------------- token heads
def test_linear_token_heads_shapes_and_gradients():
    torch.manual_seed(4)
    heads = TokenHeads(input_dim=10, num_tokens=3, token_dim=D)
    tokens = heads(torch.randn(5, 10))
    assert tokens.shape == (5, 3, D)
    tokens.sum().backward()
    assert all(p.grad is not None for p in heads.parameters())
    field_heads = TokenHeads(input_dim=4, num_tokens=2, token_dim=D, num_fields=3)
    assert field_heads(torch.randn(5, 3, 4)).shape == (5, 2, D)


def test_senet_token_heads_reweight_fields_per_token():
    torch.manual_seed(5)
    heads = TokenHeads(input_dim=4, num_tokens=3, token_dim=D, head_type="senet", num_fields=6,
                       reduction_ratio=2)
    fields = torch.randn(5, 6, 4)
    tokens = heads(fields)
    assert tokens.shape == (5, 3, D) and torch.isfinite(tokens).all()
    tokens.square().sum().backward()
    assert all(p.grad is not None for p in heads.parameters())
    first_weights = heads.excitations[0].excitation(fields.mean(-1))
    second_weights = heads.excitations[1].excitation(fields.mean(-1))
    assert first_weights.shape == (5, 6) and not torch.allclose(first_weights, second_weights)
    assert bool(((first_weights > 0) & (first_weights < 1)).all())                 # sigmoid excitation


def test_interest_heads_attend_over_valid_slots_by_content():
    torch.manual_seed(7)
    heads = InterestHeads(input_dim=4, summary_dim=3, num_tokens=3, token_dim=D)
    slots, summary = torch.randn(4, 5, 4), torch.randn(4, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    weights = heads.attention(slots, mask)                                            # [B, K, L]
    assert torch.allclose(weights.sum(-1), mask.any(1, keepdim=True).float().expand(4, 3))
    assert (weights[~mask.unsqueeze(1).expand_as(weights)] == 0).all()               # padding gets no weight
    assert not torch.allclose(weights[0, 0], weights[0, 1])                          # tokens attend differently
    tokens = heads(slots, mask, summary)
    assert tokens.shape == (4, 3, D) and torch.isfinite(tokens).all()
    # What sits in a padding slot does not matter; a user without history gets the summary part alone.
    changed = slots.clone()
    changed[~mask] = 100.0
    assert torch.allclose(heads(changed, mask, summary), tokens)
    assert torch.allclose(tokens[3], heads.summary_heads(summary[3]).view(3, D))
    # Content, not position: permuting the valid slots permutes nothing in the tokens.
    order = torch.tensor([4, 2, 0, 3, 1])
    assert torch.allclose(heads(slots[:1, order], mask[:1], summary[:1]), tokens[:1], atol=1e-6)
    tokens.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in heads.parameters())
    with pytest.raises(ValueError, match=r"expected \[B, L, 4\] and \[B, L\]"):
        heads(slots, mask[:, :3], summary)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        InterestHeads(num_tokens=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_type="senet"), "needs num_fields"),
    (dict(head_type="attention"), "head_type='attention'"),
    (dict(head_type="recent"), "head_type='recent'"),
    (dict(head_type="senet", num_fields=3, reduction_ratio=0), "reduction_ratio must be a positive int"),
    (dict(num_tokens=0), "num_tokens must be a positive int"),
])
def test_token_heads_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenHeads(**{"input_dim": 4, "num_tokens": 2, "token_dim": D, **kwargs})


def test_token_heads_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expected \[B, 3, 4\]"):
        TokenHeads(input_dim=4, num_tokens=2, token_dim=D, head_type="senet", num_fields=3)(torch.randn(2, 4, 4))


def test_gru_gradients_reach_parameters_and_inputs():
    torch.manual_seed(6)
    encoder = GRUEncoder(input_dim=D, hidden_dim=6)
    seq = torch.randn(3, 5, D, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5, [False] * 5])
    outputs, last = encoder(seq, mask)
    (outputs.sum() + last.square().sum()).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in encoder.parameters())
    assert float(seq.grad[0, :2].abs().sum()) == 0.0 and float(seq.grad[0, 2:].abs().sum()) > 0
