"""SparCode model-level tests on the tiny dataset (the quantizer's own tests are in test_quantizer.py; the
warm-up, frozen-codes and codebook-statistics callbacks are tested in test_engine.py)."""
import pytest
import torch
import torch.nn.functional as F

from model_zoo.engine.evaluator import Evaluator
from model_zoo.engine.experiment import run_experiment
from model_zoo.engine.trainer import Trainer
from model_zoo.layers import interaction as interaction_module
from model_zoo.layers.quantizer import GRADIENT_MODES
from model_zoo.models.sparcode import SparCode

from .conftest import open_tiny, write_config

SMALL = {"embedding_dim": 8, "token_dim": 8, "num_query_tokens": 2, "num_item_tokens": 2, "num_codebooks": 2,
         "codebook_size": 8, "hidden_units": [8], "tokenizer_hidden_units": [16], "net_dropout": 0.0}
EVALUATOR = Evaluator(["Recall(k=20)", "NDCG(k=20)"], eval_batch_size=64, verbose=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_raw):
    root = tmp_path_factory.mktemp("sparcode")
    config = write_config(str(root), tiny_raw, {"SparCode_tiny": {"model": "SparCode", "dataset_id": "tiny",
                                                                  **SMALL}})
    return dict(open_tiny(config, "SparCode_tiny", batch_size=32), config=config, root=str(root))


def _model(tiny, seed=0, **overrides):
    torch.manual_seed(seed)
    params = dict(tiny["params"], num_negatives=10)
    params.update(overrides)
    model = SparCode(tiny["feature_map"], **params)
    model.set_item_corpus(tiny["corpus"], tiny["train"].item_counts(tiny["corpus"].num_items))
    return model


def _batch(tiny):
    batch = next(iter(tiny["train"]))
    return batch, batch.pop("item_index")


def _trainer(model, steps=3):
    return Trainer(model, EVALUATOR, epochs=1, max_steps_per_epoch=steps, verbose=False)


def _train_steps(model, tiny, steps=3):
    _trainer(model, steps).train_epoch(tiny["train"])


def _matching_loss(model, batch, positives):
    """Eq. 12 alone (no commitment term): the positive against every item of the corpus."""
    user_repr = model.encode_users(batch)
    logits = model.score_matrix(user_repr, model.encode_items(model.items(torch.arange(model.item_corpus.num_items))))
    return F.cross_entropy(logits, positives)


def _tokenizer_grad_norm(model, loss):
    params = list(model.tokenizer.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_matching_loss_reaches_tokenizer_only_with_straight_through(tiny, mode):
    model = _model(tiny, quantizer_grad=mode)
    model.train()
    batch, positives = _batch(tiny)
    match = _matching_loss(model, batch, positives)
    commit = model.auxiliary_loss()
    assert torch.is_tensor(commit) and float(commit.detach()) > 0
    if mode != "commitment_only":
        assert _tokenizer_grad_norm(model, match) > 0
    else:
        assert _tokenizer_grad_norm(model, match) == 0.0
    # In both modes the commitment term trains the tokenizer, and the matching loss trains the scorer.
    assert _tokenizer_grad_norm(model, commit) > 0
    scorer_grads = torch.autograd.grad(match, list(model.scorer.parameters()), retain_graph=True)
    assert sum(float(g.abs().sum()) for g in scorer_grads) > 0


def test_codebooks_get_no_optimizer_gradient_and_move_by_ema(tiny):
    model = _model(tiny)
    optimized = {id(p) for group in _trainer(model).optimizer.param_groups for p in group["params"]}
    assert id(model.quantizer.codebooks) not in optimized
    assert not any(name.startswith("quantizer.") for name, _ in model.named_parameters())
    assert id(model.bias) in optimized
    _train_steps(model, tiny, steps=1)                                  # k-means initialisation
    before = model.quantizer.codebooks.clone()
    _train_steps(model, tiny, steps=2)
    assert model.quantizer.codebooks.grad is None and not model.quantizer.codebooks.requires_grad
    assert not torch.equal(before, model.quantizer.codebooks)          # moved by the EMA update


def test_relu_zeroes_scores_below_minus_b(tiny):
    model = _model(tiny)
    _train_steps(model, tiny, steps=2)
    model.eval()
    users = tiny["valid"].batch(0, 16)
    keys = model.query_codes(users)                                     # [16, K_u]
    raw = model.score_codes(keys.reshape(-1)).view(16, 2, -1)           # [16, K_u, n_items]
    with torch.no_grad():
        model.bias.fill_(-float(raw.median()))                          # about half of S + b is negative
        final = model.full_scores(users, model.all_item_repr())         # [16, n_items]
        shifted = raw + model.bias                                      # S + b
    below = (shifted < 0).all(dim=1)                                    # every token has S < -b
    above = (shifted > 0).any(dim=1)
    assert below.sum() > 100 and above.sum() > 100
    assert torch.all(final[below] == 0.0)
    assert torch.all(final[above] > 0.0)
    expected = torch.relu(raw + model.sparse_bias).sum(dim=1)
    assert torch.allclose(final, expected, atol=1e-5)


def test_serving_hooks_match_forward_scores(tiny):
    model = _model(tiny)
    _train_steps(model, tiny, steps=3)
    model.eval()
    users = tiny["valid"].batch(0, 20)
    keys = model.query_codes(users)
    assert keys.dtype == torch.long and keys.shape == (20, 2)
    with torch.no_grad():
        quantized, forward_keys = model.encode_users(users)
        tokens = model.user_tokens(users)
    assert torch.equal(keys, forward_keys)
    assert torch.equal(model.code_vectors(keys), quantized)
    # The quantized vector is the nearest codeword per sub-vector (checked by brute force on codebook 0).
    codebook = model.quantizer.codebooks[0]                             # [N, d]
    nearest = torch.cdist(tokens[..., :4].reshape(-1, 4), codebook).argmin(1)
    assert torch.equal(nearest, model.quantizer.unpack_keys(keys).reshape(-1, 2)[:, 0])
    # score_codes (S before relu) + sparse_bias gives the forward scores, for all or some items.
    unique, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    raw = model.score_codes(unique)                                     # [n_unique, n_items]
    from_index = torch.relu(raw[inverse] + model.sparse_bias).view(20, 2, -1).sum(1)
    items = torch.arange(model.item_corpus.num_items)
    with torch.no_grad():
        forward = model(users, items.unsqueeze(0).expand(20, -1))      # score_pairs path
        full = model.full_scores(users, model.all_item_repr())         # score_matrix path (dedup)
    assert torch.allclose(from_index, forward, atol=1e-5)
    assert torch.allclose(full, forward, atol=1e-5)
    some = torch.tensor([5, 0, 17])
    assert torch.allclose(model.score_codes(unique, some), raw[:, some], atol=1e-6)
    assert model.score_codes(unique, torch.tensor([], dtype=torch.long)).shape == (len(unique), 0)


def test_chunked_scores_equal_unchunked(tiny, monkeypatch):
    model = _model(tiny)
    model.eval()
    users = tiny["valid"].batch(0, 8)
    with torch.no_grad():
        user_repr, items = model.encode_users(users), model.all_item_repr()
        whole = model.score_matrix(user_repr, items)
        monkeypatch.setattr(interaction_module, "PAIR_BUDGET", 1000)    # many small chunks
        assert torch.allclose(model.score_matrix(user_repr, items), whole, atol=1e-5)
        assert torch.allclose(model.scorer.all_pairs(user_repr[0].reshape(-1, 8), items, item_chunk=7),
                              model.scorer.all_pairs(user_repr[0].reshape(-1, 8), items), atol=1e-6)
        # score_tokens on the quantized tokens = the deduplicated key path of score_matrix
        assert torch.allclose(model.score_tokens(user_repr[0], items), whole, atol=1e-5)


@pytest.mark.parametrize("tokenizer,token_heads,interaction", [
    ("dnn", "senet", "dot"), ("gru", "linear", "maxsim"), ("gru", "senet", "crossnet"),
    ("sa", "linear", "dnn"), ("sa", "senet", "innerp_dnn"), ("dnn", "attention", "innerp_dnn"),
    ("gru", "attention", "dot")])
def test_variants_train_and_evaluate(tiny, tokenizer, token_heads, interaction):
    item_hidden_units = [16] if tokenizer == "sa" else []
    model = _model(tiny, tokenizer=tokenizer, token_heads=token_heads, interaction=interaction, num_layers=1,
                   item_hidden_units=item_hidden_units)
    assert isinstance(model.item_encoder, torch.nn.Identity) == (not item_hidden_units)
    model.train()
    batch, positives = _batch(tiny)
    loss = model.sampled_softmax_loss(batch, positives)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    head_weight = {"senet": lambda h: h.heads[0].weight, "linear": lambda h: h.heads.weight,
                   "attention": lambda h: h.queries}[token_heads](model.tokenizer.heads)
    assert float(head_weight.grad.abs().sum()) > 0
    metrics = EVALUATOR.evaluate(model, tiny["valid"])
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_same_seed_same_result(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = []
    for _ in range(2):
        result = run_experiment(tiny["config"], "SparCode_tiny")
        state = torch.load(result["checkpoint"], weights_only=True)
        results.append((result["test"], result["history"][0]["loss"], state))
    (test_a, loss_a, state_a), (test_b, loss_b, state_b) = results
    assert test_a == test_b and loss_a == loss_b
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert "quantizer.codebooks" in state_a


@pytest.mark.parametrize("key,value,allowed", [("tokenizer", "cnn", "dnn"), ("token_heads", "recent", "senet"),
                                               ("interaction", "cosine", "innerp_dnn"),
                                               ("quantizer_grad", "rotation", "commitment_only"),
                                               ("num_query_tokens", 0, "positive int")])
def test_invalid_hyperparameters_raise_naming_them(tiny, key, value, allowed):
    with pytest.raises(ValueError, match=f"{key}={value!r}.*{allowed}"):
        _model(tiny, **{key: value})


@pytest.mark.parametrize("value", [[0], [8, "16"], [True], 256])
def test_item_hidden_units_must_be_positive_ints(tiny, value):
    with pytest.raises(ValueError, match="item_hidden_units=.*positive ints"):
        _model(tiny, item_hidden_units=value)


def test_token_dim_must_split_into_codebooks(tiny):
    with pytest.raises(ValueError, match="token_dim=9"):
        _model(tiny, token_dim=9)


@pytest.mark.parametrize("kind", ["dnn", "gru", "sa"])
@pytest.mark.parametrize("heads", ["linear", "senet", "attention"])
def test_user_tokenizer_shapes_and_history_use(kind, heads):
    from model_zoo.layers.tokenizers import UserTokenizer
    torch.manual_seed(0)
    tokenizer = UserTokenizer(kind, embedding_dim=8, num_fields=3, num_tokens=4, token_dim=6, token_heads=heads,
                              hidden_units=[16], history_len=5, num_layers=1)
    fields, history = torch.randn(7, 3, 8), torch.randn(7, 5, 8)
    mask = torch.arange(5).unsqueeze(0) >= torch.tensor([0, 1, 2, 3, 4, 5, 2]).unsqueeze(1)   # left padded
    tokens = tokenizer(fields, history, mask)
    assert tokens.shape == (7, 4, 6) and torch.isfinite(tokens).all()
    assert not torch.equal(tokens[0], tokens[1])                                    # users differ
    assert not torch.allclose(tokens[:, 0], tokens[:, 1])                          # tokens differ
    changed = history.clone()
    changed[~mask] = 100.0                                                          # padding content
    assert torch.allclose(tokenizer(fields, changed, mask), tokens, atol=1e-5)
    if tokenizer.needs_history:
        changed[0, -1] = torch.randn(8)                                             # a valid history item
        assert not torch.allclose(tokenizer(fields, changed, mask)[0], tokens[0])
        with pytest.raises(ValueError, match="needs the history"):
            tokenizer(fields)
    assert tokenizer.needs_history == (kind != "dnn" or heads == "attention")


def test_user_tokenizer_invalid_arguments():
    from model_zoo.layers.tokenizers import UserTokenizer
    with pytest.raises(ValueError, match="tokenizer='lstm'"):
        UserTokenizer("lstm")
    with pytest.raises(ValueError, match="token_heads='recent'"):
        UserTokenizer(token_heads="recent")
    with pytest.raises(ValueError, match="num_fields"):
        UserTokenizer("dnn", num_fields=0)
    with pytest.raises(ValueError, match="fields shape"):
        UserTokenizer("dnn", embedding_dim=8, num_fields=2)(torch.randn(3, 4, 8))


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_unquantized_tokens_feed_keeps_the_gradient_mode(tiny, mode):
    """With feed_unquantized_tokens (set by the quantizer_warmup callback) training gets the tokens, evaluation the codes."""
    model = _model(tiny, quantizer_grad=mode)
    model.train()
    batch, positives = _batch(tiny)
    model.feed_unquantized_tokens = True
    quantized, keys = model.encode_users(batch)
    with torch.no_grad():
        tokens = model.user_tokens(batch)
    assert torch.allclose(quantized, tokens) and not torch.allclose(quantized, model.code_vectors(keys))
    match = model.score_matrix((quantized, keys), model.encode_items(model.items(positives))).sum()
    assert (_tokenizer_grad_norm(model, match) > 0) == (mode != "commitment_only")
    model.eval()
    with torch.no_grad():
        quantized, keys = model.encode_users(batch)
    assert torch.equal(quantized, model.code_vectors(keys))


def test_frozen_user_side_trains_on_the_served_codes_without_commitment(tiny):
    """After freeze_user_side (the freeze_codes callback) a training forward gives exactly the served codes."""
    model = _model(tiny, net_dropout=0.5)
    _train_steps(model, tiny, steps=2)
    model.freeze_user_side()
    model.train()
    assert not model.tokenizer.training and model.scorer.training                  # no dropout on the frozen side
    batch, _ = _batch(tiny)
    quantized, keys = model.encode_users(batch)
    assert not quantized.requires_grad and torch.equal(quantized, model.code_vectors(keys))
    assert model.auxiliary_loss() == 0.0                                            # the commitment is a constant
    _train_steps(model, tiny, steps=2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_users(batch)[1], keys)                     # every user keeps its codes


def test_history_features_item_embeds_history_through_item_fields(tiny):
    from model_zoo.data.feature_processor import HISTORY_FEATURE
    from model_zoo.layers.field_embedding import FieldEmbedding
    model = _model(tiny, history_features="item", token_heads="attention")
    batch, _ = _batch(tiny)
    history, mask = model.embedding.sequence(batch)                                 # [B, L, D], [B, L]
    ids = batch[HISTORY_FEATURE]
    assert torch.equal(mask, ids != 0) and mask.any() and (~mask).any()
    row, col = [int(i) for i in mask.nonzero()[0]]
    item_fields = model.embedding.fields(model.items(ids[row, col:col + 1] - 1), "item")  # [1, F_i, D]
    assert item_fields.shape[1] > 1                                                  # id plus item features
    assert torch.allclose(history[row, col], item_fields.mean(1)[0])
    assert (history[~mask] == 0).all()
    # The pooled history field of the dnn tokenizer is the mean over the valid positions.
    names = model.embedding.field_names("user")
    pooled = model.embedding.fields(batch, "user")[:, names.index(HISTORY_FEATURE)]  # [B, D]
    expected = history.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    assert torch.allclose(pooled, expected, atol=1e-6)
    # The user side now trains the item features' embeddings (not only the shared id table).
    model.user_tokens(batch).square().sum().backward()
    item_only = [n for n in model.embedding.field_names("item") if n != "item_id"]
    grads = [model.embedding.embeddings.embedding_layers[n].weight.grad for n in item_only]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # Without an item corpus the history cannot be embedded; an unknown mode names the key.
    bare = FieldEmbedding(tiny["feature_map"], 8, history_features="item")
    with pytest.raises(RuntimeError, match="needs the item corpus"):
        bare.sequence(batch)
    with pytest.raises(ValueError, match="history_features='tags'"):
        _model(tiny, history_features="tags")


def test_train_sparsity_reaches_its_target_and_every_parameter_learns(tiny):
    """With train_sparsity the share of zeroed training scores is the target (the threshold is the quantile of the
    negatives' scores), b is a buffer following the thresholds, and every trainable parameter gets a gradient."""
    model = _model(tiny, train_sparsity=0.9, interaction="innerp_dnn", token_norm="l2")
    assert "bias" not in dict(model.named_parameters()) and "bias" in dict(model.named_buffers())
    model.train()
    batch, positives = _batch(tiny)
    loss = model.sampled_softmax_loss(batch, positives)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    # the negatives' call sets b; their zeroed share is the target, the positives' is what the model earns
    user_repr = model.encode_users(batch)
    items = model.encode_items(model.items(torch.arange(model.item_corpus.num_items)))
    with torch.enable_grad():
        model.score_matrix(user_repr, items)
    assert model.step_stats["zero_scores"] / model.step_stats["scores"] == pytest.approx(0.9, abs=0.01)
    _train_steps(model, tiny, steps=5)
    assert model.sparse_bias == pytest.approx(float(model.bias))
    # evaluation scores with the EMA of the training thresholds: most (code, item) scores are zero
    model.eval()
    with torch.no_grad():
        keys = torch.unique(model.query_codes(batch))
        raw = model.score_codes(keys)
    assert 0.5 < float((raw + model.sparse_bias <= 0).float().mean()) < 1.0


def test_train_sparsity_needs_uniform_negatives_and_a_share_in_0_1(tiny):
    with pytest.raises(ValueError, match="train_sparsity=1.5"):
        _model(tiny, train_sparsity=1.5)
    with pytest.raises(ValueError, match="negative_sampler='uniform'.*'in_batch'"):
        _model(tiny, train_sparsity=0.9, token_norm="l2", negative_sampler="in_batch")
    with pytest.raises(ValueError, match="train_sparsity needs token_norm='l2', got 'none'"):
        _model(tiny, train_sparsity=0.9)
    with pytest.raises(ValueError, match="token_norm='unit'"):
        _model(tiny, token_norm="unit")


def test_sparse_grad_leak_keeps_the_forward_value_and_passes_gradient_below_the_threshold(tiny):
    """The leak changes only the backward pass: scores are the served relu(S + b), and a score below the
    threshold gets gradient sparse_grad_leak instead of 0 (only with train_sparsity)."""
    model = _model(tiny, train_sparsity=0.9, token_norm="l2", sparse_grad_leak=0.25)
    model.train()
    model._step_threshold = torch.tensor(-0.5)
    scores = torch.tensor([[0.2, 0.9], [0.1, 0.4]], requires_grad=True)           # [B=2, K_u=2]
    summed = model._sparse_sum(scores)
    assert torch.allclose(summed, torch.tensor([0.4, 0.0]))                         # relu(S - 0.5) summed
    summed.sum().backward()
    assert torch.allclose(scores.grad, torch.tensor([[0.25, 1.0], [0.25, 0.25]]))
    dense = _model(tiny, sparse_grad_leak=0.25)                                     # learned b: no leak
    dense.train()
    raw = torch.tensor([[-5.0, 0.0]], requires_grad=True)
    dense._sparse_sum(raw).sum().backward()
    assert float(raw.grad[0, 0]) == 0.0
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match=f"sparse_grad_leak={bad!r}; expected a number in \\[0, 1.0\\]"):
            _model(tiny, train_sparsity=0.9, token_norm="l2", sparse_grad_leak=bad)
    with pytest.raises(ValueError, match="dense_loss_weight=-1"):
        _model(tiny, dense_loss_weight=-1)


def test_flops_penalty_is_the_squared_mean_activation_and_lowers_the_scores(tiny):
    """flops_weight adds mean over tokens of (mean over sampled items of relu(S + b))^2 to the loss; its
    gradient pushes b and the scores down. It needs a learned b."""
    model = _model(tiny, flops_weight=2.0, token_norm="l2")
    model.train()
    batch, positives = _batch(tiny)
    user_repr = model.encode_users(batch)
    items = model.encode_items(model.items(torch.arange(model.item_corpus.num_items)))
    model.score_matrix(user_repr, items)                                            # the sampled call
    quantized, _ = user_repr
    raw = model.scorer.all_pairs(quantized.reshape(-1, quantized.shape[-1]), items)  # [B * K_u, C]
    expected = (torch.relu(raw + model.bias).mean(dim=1) ** 2).mean()
    assert torch.allclose(model._flops, expected, atol=1e-6) and float(expected.detach()) > 0
    penalty = model.auxiliary_loss() - (model._commit_loss if model._commit_loss is not None else 0.0)
    assert torch.allclose(penalty, 2.0 * expected, atol=1e-6)
    model.zero_grad()
    penalty.backward()
    assert float(model.bias.grad) > 0                                                # descent lowers b
    with pytest.raises(ValueError, match="flops_weight=1.0 needs a learned b"):
        _model(tiny, flops_weight=1.0, train_sparsity=0.9, token_norm="l2")
    with pytest.raises(ValueError, match="flops_weight=-1"):
        _model(tiny, flops_weight=-1)


def test_token_norm_gives_unit_tokens(tiny):
    model = _model(tiny, token_norm="l2")
    batch, _ = _batch(tiny)
    tokens = model.user_tokens(batch)
    items = model.encode_items(model.items(torch.arange(5)))
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[:-1]), atol=1e-5)
    assert torch.allclose(items.norm(dim=-1), torch.ones(items.shape[:-1]), atol=1e-5)
