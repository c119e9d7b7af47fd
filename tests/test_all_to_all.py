"""AllToAllSA: the cached-user form equals the full joint encoder with the user tokens masked from the item (and
differs from the bidirectional one), item states depend on the user, chunk-invariant scoring, evaluation that
encodes each user once, training, and a dataset without static user fields."""
import logging
import os

import numpy as np
import pytest
import torch

from model_zoo import get_model
from model_zoo.data.loaders import EvalUsers

from .conftest import open_tiny, optimizer_for, rank, write_config

SMALL = {"model": "AllToAllSA", "dataset_id": "tiny", "embedding_dim": 16, "num_layers": 2, "num_heads": 2,
         "hidden_units": [16], "num_negatives": 10, "batch_size": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_raw):
    root = tmp_path_factory.mktemp("all_to_all")
    config = write_config(str(root), tiny_raw, {"A2A_tiny": dict(SMALL)})
    return open_tiny(config, "A2A_tiny")


def _model(tiny, trained_scale=True, **overrides):
    """The model in eval mode; `trained_scale` redraws the embedding tables at the scale of a trained
    model (FuxiCTR's init, std 1e-4, makes every token nearly alike)."""
    params = dict(tiny["params"], **overrides)
    torch.manual_seed(0)
    model = get_model("AllToAllSA")(tiny["feature_map"], **params)
    model.set_item_corpus(tiny["corpus"], tiny["train"].item_counts(tiny["corpus"].num_items))
    if trained_scale:
        with torch.no_grad():
            for table in model.embedding.embeddings.embedding_layers.values():
                if hasattr(table, "weight"):
                    table.weight.normal_(0.0, 0.3)
            if model.cls_token is not None:
                model.cls_token.normal_(0.0, 0.3)
    return model.eval()


def _full_twin(tiny, cached, user_attends_items):
    """A full-form model with the weights of `cached`."""
    twin = _model(tiny, attention_form="full", user_attends_items=user_attends_items, pooling=cached.pooling)
    twin.load_state_dict(cached.state_dict())
    return twin


def _users(tiny, count=6):
    batch = next(iter(tiny["train"]))
    batch.pop("item_index")
    users = {k: v[:count] for k, v in batch.items()}
    users["hist_item_id"][0, :4] = 0                                                    # a shorter history
    return users


@pytest.mark.parametrize("pooling", ["cls", "item", "mean"])
def test_cached_user_form_equals_the_full_form_without_user_to_item_attention(tiny, pooling):
    cached = _model(tiny, pooling=pooling)
    masked, joint = _full_twin(tiny, cached, False), _full_twin(tiny, cached, True)
    users = _users(tiny)
    with torch.no_grad():
        scores = {name: m.full_scores(users, m.all_item_repr()) for name, m in
                  (("cached", cached), ("masked", masked), ("joint", joint))}          # each [6, num_items]
    assert torch.allclose(scores["cached"], scores["masked"], atol=1e-5), \
        float((scores["cached"] - scores["masked"]).abs().max())
    # letting the user tokens see the item changes the scores (the bidirectional paper form)
    assert float((scores["cached"] - scores["joint"]).abs().max()) > 1e-3


def test_full_form_user_states_see_the_candidate_and_cached_item_states_depend_on_the_user(tiny):
    model = _full_twin(tiny, _model(tiny), True)
    users = _users(tiny)
    with torch.no_grad():
        tokens, mask = model.user_tokens(users)                                          # [B, T_u, D], [B, T_u]
        items = model._candidates(model.encode_items(model.items(torch.tensor([3, 17, 3]))).unsqueeze(0))
        outputs = [model.encoder.full(tokens, mask, items[:, k].expand(len(mask), -1, -1))[0] for k in range(3)]
    change = (outputs[0] - outputs[1]).abs().amax(-1)                                    # [B, T_u]
    assert bool((change[mask] > 1e-3).all()), change          # every valid user token sees the candidate ...
    assert torch.allclose(outputs[0], outputs[2], atol=1e-6)  # ... and the same candidate gives the same states
    assert int((~mask).sum()) >= 4 and float(outputs[0][~mask].abs().max()) == 0.0      # padding outputs zero
    cached = _model(tiny)
    with torch.no_grad():
        cache = cached.encode_users(users)
        item_states = cached.encoder.encode_candidates(cache, cached._candidates(
            cached.encode_items(cached.items(torch.tensor([3]))).unsqueeze(0)))          # [B, 1, T_c, D]
    # one item, several users: its states differ per user (no user-independent item vector to index)
    assert float((item_states[0] - item_states[1:]).abs().amax()) > 1e-3


def test_chunked_scoring_equals_unchunked_and_the_pair_path(tiny):
    model = _model(tiny)
    users = _users(tiny, 5)
    num_items = tiny["corpus"].num_items
    with torch.no_grad():
        item_repr = model.all_item_repr()                                               # [N, F_i, D]
        model.pair_chunk = 10 ** 9
        whole = model.full_scores(users, item_repr, item_chunk=num_items)               # one encoder call
        model.pair_chunk = 7                                                            # 1 item x 5 users
        chunked = model.full_scores(users, item_repr, item_chunk=13)
        # the training path (each user's own candidates) agrees with the matrix path
        picks = torch.randint(0, num_items, (5, 9), generator=torch.Generator().manual_seed(0))
        paired = model(users, picks)                                                    # [5, 9]
    assert whole.shape == (5, num_items)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(paired, whole.gather(1, picks), atol=1e-5)


def test_ranking_encodes_each_user_once_and_a_seeded_subset_equals_full_rows(tiny, caplog):
    model = _model(tiny)
    path = os.path.join(tiny["data_dir"], "valid.h5")
    num_items = tiny["corpus"].num_items
    full = EvalUsers(path, tiny["feature_map"], num_items)
    subset = EvalUsers(path, tiny["feature_map"], num_items, max_users=8, seed=5)
    again = EvalUsers(path, tiny["feature_map"], num_items, max_users=8, seed=5)
    assert len(subset) == 8 and np.array_equal(subset.rows, again.rows)                 # same users every time
    encoded, encode_user = [], model.encoder.encode_user
    model.encoder.encode_user = lambda tokens, mask: encoded.append(len(mask)) or encode_user(tokens, mask)
    full_topk = rank(model, full, 20)
    assert sum(encoded) == len(full)                                  # the user states once per user
    model.eval_pairs_per_block, model.ranking_log_seconds = num_items * 3, 0.0        # blocks of 3 users
    with caplog.at_level(logging.INFO):
        subset_topk = rank(model, subset, 20)
    assert np.array_equal(subset_topk, full_topk[subset.rows])
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rank:")]
    assert len(progress) == 3 and progress[-1].startswith(f"rank: 8/8 users x {num_items} items")
    assert all("s left" in line for line in progress)


@pytest.mark.parametrize("form, mixed", [("cached_user", False), ("full", False), ("cached_user", True)])
def test_training_lowers_the_loss_and_reaches_every_parameter(tiny, form, mixed):
    model = _model(tiny, trained_scale=False, encoder_dropout=0.0, net_dropout=0.0, attention_form=form,
                   mixed_precision=mixed)
    optimizer = optimizer_for(model, 3.e-3)
    batch = next(iter(tiny["train"]))
    positives = batch.pop("item_index")
    model.train()
    losses = []
    for step in range(12):
        optimizer.zero_grad()
        loss = model.sampled_softmax_loss(batch, positives)
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    if mixed:   # bfloat16 only while training: evaluation scores are the float32 ones
        plain = _model(tiny, trained_scale=False, encoder_dropout=0.0, net_dropout=0.0, attention_form=form)
        plain.load_state_dict(model.state_dict())
        users = _users(tiny)
        with torch.no_grad():
            model.eval()
            assert torch.equal(model.full_scores(users, model.all_item_repr()),
                               plain.full_scores(users, plain.all_item_repr()))


def test_poolings_on_a_dataset_without_user_fields(tmp_path, tiny_raw):
    item_only = [{"name": "category", "type": "categorical", "source": "item"},
                 {"name": "tags", "type": "sequence", "source": "item", "max_len": 4}]
    config = write_config(str(tmp_path), tiny_raw, {"A2A_tiny": dict(SMALL)}, {"feature_cols": item_only})
    data = open_tiny(config, "A2A_tiny")
    users = _users(data, 4)
    users["hist_item_id"][0, :-1] = 0                                                   # one history item
    for pooling in ("cls", "mean", "item"):
        model = _model(data, pooling=pooling)
        tokens, mask = model.user_tokens(users)
        assert model.user_field_names == [] and tokens.shape[1] == 10 and int(mask[0].sum()) == 1   # history only
        with torch.no_grad():
            scores = model.full_scores(users, model.all_item_repr())
        assert scores.shape == (4, data["corpus"].num_items) and bool(torch.isfinite(scores).all()), pooling
        assert float(scores.std(1).min()) > 0.0, pooling                                # items are told apart


@pytest.mark.parametrize("overrides, key", [({"pooling": "max"}, "pooling"), ({"pair_chunk": 0}, "pair_chunk"),
                                            ({"eval_pairs_per_block": -1}, "eval_pairs_per_block"),
                                            ({"attention_form": "cross"}, "attention_form"),
                                            ({"mixed_precision": "bf16"}, "mixed_precision"),
                                            ({"user_attends_items": True}, "user_attends_items"),
                                            ({"attention_form": "full", "user_attends_items": 1}, "user_attends_items")])
def test_bad_arguments_raise_naming_the_value(tiny, overrides, key):
    with pytest.raises(ValueError, match=key):
        get_model("AllToAllSA")(tiny["feature_map"], **dict(tiny["params"], **overrides))
