"""AllToAllSA: early fusion (user tokens see the candidate), chunk-invariant brute-force scoring,
evaluation on a seeded user subset, training, and a dataset without static user fields."""
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
    return model.eval()


def _users(tiny, count=6):
    batch = next(iter(tiny["train"]))
    batch.pop("item_index")
    return {k: v[:count] for k, v in batch.items()}


def test_user_token_outputs_change_with_the_candidate_item(tiny):
    model = _model(tiny)
    users = _users(tiny)
    users["hist_item_id"][0, :4] = 0                                                    # a shorter history
    with torch.no_grad():
        user_repr = model.encode_users(users)                                           # ([B, T_u, D], [B, T_u])
        num_users, num_user_tokens = user_repr[1].shape
        items = model.encode_items(model.items(torch.tensor([3, 17, 3])))              # [3, F_i, D]
        outputs, valid = model.joint_outputs(user_repr, items.unsqueeze(0).expand(num_users, -1, -1, -1))
    user_outputs = outputs[:, :, :num_user_tokens]                                      # [B, 3, T_u, D]
    user_valid = valid[:, 0, :num_user_tokens]                                          # [B, T_u]
    change = (user_outputs[:, 0] - user_outputs[:, 1]).abs().amax(-1)                   # [B, T_u]
    # every valid user-side token (CLS, user fields, history items) sees the candidate ...
    assert bool((change[user_valid] > 1e-3).all()), change
    # ... and the same candidate gives the same outputs (the change is the item's, not noise)
    assert torch.allclose(user_outputs[:, 0], user_outputs[:, 2], atol=1e-6)
    # history padding is no token: its outputs are zero
    assert int((~user_valid).sum()) >= 4 and float(user_outputs[:, 0][~user_valid].abs().max()) == 0.0


def test_chunked_scoring_equals_unchunked(tiny):
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


def test_retrieve_on_seeded_subset_equals_full_rows_and_logs_progress(tiny, caplog):
    model = _model(tiny)
    path = os.path.join(tiny["data_dir"], "valid.h5")
    num_items = tiny["corpus"].num_items
    full = EvalUsers(path, tiny["feature_map"], num_items)
    subset = EvalUsers(path, tiny["feature_map"], num_items, max_users=8, seed=5)
    again = EvalUsers(path, tiny["feature_map"], num_items, max_users=8, seed=5)
    assert len(subset) == 8 and np.array_equal(subset.rows, again.rows)                 # same users every time
    full_topk = rank(model, full, 20)
    model.eval_pairs_per_block, model.ranking_log_seconds = num_items * 3, 0.0        # blocks of 3 users
    with caplog.at_level(logging.INFO):
        subset_topk = rank(model, subset, 20)
    assert np.array_equal(subset_topk, full_topk[subset.rows])
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rank:")]
    assert len(progress) == 3 and progress[-1].startswith(f"rank: 8/8 users x {num_items} items")
    assert all("s left" in line for line in progress)


def test_training_lowers_the_loss_and_reaches_every_parameter(tiny):
    model = _model(tiny, trained_scale=False, encoder_dropout=0.0, net_dropout=0.0)
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


def test_poolings_on_a_dataset_without_user_fields(tmp_path, tiny_raw):
    item_only = [{"name": "category", "type": "categorical", "source": "item"},
                 {"name": "tags", "type": "sequence", "source": "item", "max_len": 4}]
    config = write_config(str(tmp_path), tiny_raw, {"A2A_tiny": dict(SMALL)}, {"feature_cols": item_only})
    data = open_tiny(config, "A2A_tiny")
    users = _users(data, 4)
    users["hist_item_id"][0, :-1] = 0                                                   # one history item
    for pooling, seq_len in (("cls", 1 + 10 + 3), ("mean", 10 + 3), ("item", 10 + 3)):
        model = _model(data, pooling=pooling)
        assert model.user_field_names == [] and model.seq_len == seq_len               # [CLS] + history + item
        with torch.no_grad():
            scores = model.full_scores(users, model.all_item_repr())
        assert scores.shape == (4, data["corpus"].num_items) and bool(torch.isfinite(scores).all()), pooling
        assert float(scores.std(1).min()) > 0.0, pooling                                # items are told apart


@pytest.mark.parametrize("key, value", [("pooling", "max"), ("pair_chunk", 0), ("eval_pairs_per_block", -1)])
def test_bad_arguments_raise_naming_the_value(tiny, key, value):
    with pytest.raises(ValueError, match=key):
        get_model("AllToAllSA")(tiny["feature_map"], **dict(tiny["params"], **{key: value}))
