"""GRU4Rec and SASRec: training examples from sequences, causality, padding, masking, faiss serving."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

from model_zoo import get_model
from model_zoo.config import load_config
from model_zoo.data.feature_processor import HISTORY_FEATURE
from model_zoo.data.h5 import read_h5
from model_zoo.data.loaders import TrainLoader
from model_zoo.data.pipeline import make_examples
from model_zoo.layers.sequence_encoders import GRUEncoder
from model_zoo.layers.towers import FieldMLPTower, SequenceUserTower
from model_zoo.retrieval.faiss_index import FaissRetriever

from .conftest import open_tiny, optimizer_for, rank, train_steps, write_config

SEQUENTIAL = ("GRU4Rec", "SASRec")
MAX_LEN = 10
SMALL = {"embedding_dim": 16, "user_hidden_units": [16], "item_hidden_units": [16]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_raw):
    """Config, built data and loaders of the tiny dataset (history window MAX_LEN), built once."""
    root = tmp_path_factory.mktemp("sequential")
    entries = {f"{name}_tiny": {"model": name, "dataset_id": "tiny", **SMALL} for name in SEQUENTIAL}
    entries["SASRec_tiny"].update(num_layers=2, num_heads=2)
    entries["DSSM_tiny"] = {"model": "DSSM", "dataset_id": "tiny", **SMALL}
    config = write_config(str(root), tiny_raw, entries, {"max_len": MAX_LEN, "min_history": 2})
    return dict(open_tiny(config, "GRU4Rec_tiny", batch_size=32), config=config, raw=tiny_raw)


def _model(tiny, name, trained_scale=True, **overrides):
    """The model in eval mode. FuxiCTR initialises embeddings with std 1e-4, which makes every
    history nearly alike; `trained_scale` redraws the item id table at the scale of a trained one."""
    params = load_config(tiny["config"], f"{name}_tiny")
    params.update(overrides)
    torch.manual_seed(0)
    model = get_model(name)(tiny["feature_map"], **params)
    model.set_item_corpus(tiny["corpus"], tiny["train"].item_counts(tiny["corpus"].num_items))
    if trained_scale:
        with torch.no_grad():
            model.embedding.embeddings.embedding_layers["item_id"].weight[1:].normal_(0.0, 0.3)
    return model.eval()


def _user_batch(tiny, histories, user_row=0):
    """User-side inputs for histories (lists of item codes, oldest first), left-padded to MAX_LEN,
    with the static features of evaluation user `user_row`."""
    batch = tiny["valid"].batch(user_row, user_row + 1)
    batch = {k: v.repeat(len(histories), *([1] * (v.dim() - 1))) for k, v in batch.items()}
    hist = torch.zeros(len(histories), MAX_LEN, dtype=torch.long)
    for row, codes in enumerate(histories):
        if codes:
            hist[row, MAX_LEN - len(codes):] = torch.tensor(codes)
    batch[HISTORY_FEATURE] = hist
    return batch


# ------------------------------------------------------------------ training examples
def test_make_examples_one_row_per_position_with_last_max_len_items():
    seq = np.array([5, 3, 8, 1, 9, 7])                                  # item_index in time order
    rows = make_examples([(4, seq)], max_len=3, min_history=2, history_ratio=0.8, is_train=True)
    assert rows["item_index"].tolist() == [8, 1, 9, 7]                   # positions 2..5
    assert rows["user_row"].tolist() == [4, 4, 4, 4]
    codes = seq + 1
    assert rows[HISTORY_FEATURE].tolist() == [[0, codes[0], codes[1]], codes[0:3].tolist(),
                                              codes[1:4].tolist(), codes[2:5].tolist()]
    every = make_examples([(4, seq)], max_len=3, min_history=0, history_ratio=0.8, is_train=True)
    assert every["item_index"].tolist() == seq.tolist() and every[HISTORY_FEATURE][0].tolist() == [0, 0, 0]


def test_train_history_user_sample_draws_other_items_of_the_user_in_time_order(tmp_path, tiny_raw):
    config = write_config(str(tmp_path), tiny_raw, {"DSSM_tiny": {"model": "DSSM", "dataset_id": "tiny", **SMALL}},
                          {"max_len": 4, "min_history": 1, "train_history": "user_sample"})
    data = open_tiny(config, "DSSM_tiny", batch_size=16)
    stored = read_h5(os.path.join(data["data_dir"], "train.h5"))
    indptr, items = stored["timeline_indptr"], stored["timeline_items"]
    timelines = [items[indptr[k]:indptr[k + 1]].tolist() for k in range(len(indptr) - 1)]
    # every training user's timeline holds its first item too (never a target with min_history = 1)
    assert sum(len(t) for t in timelines) == len(stored["item_index"]) + len(timelines)
    epochs = []
    for _ in range(2):
        drawn = []
        for batch in data["train"]:
            for hist, target in zip(batch[HISTORY_FEATURE].tolist(), batch["item_index"].tolist()):
                drawn.append((tuple(hist), target))
        epochs.append(drawn)
    rows_by_target = {}
    for t, timeline in enumerate(timelines):
        for code in timeline:
            rows_by_target.setdefault(code - 1, []).append(timeline)
    for hist, target in epochs[0]:
        codes = [c for c in hist if c != 0]
        assert list(hist[:4 - len(codes)]) == [0] * (4 - len(codes))        # left-padded
        owners = [t for t in rows_by_target[target] if set(codes) <= set(t)]
        assert owners, "a sampled history item is not from the target's user"
        assert target + 1 not in codes
        assert any(len(codes) == min(4, len(set(t) - {target + 1})) for t in owners)   # up to max_len
    assert sorted(t for _, t in epochs[0]) == sorted(stored["item_index"].tolist())
    assert epochs[0] != epochs[1]                                            # a fresh draw every epoch


def test_sample_histories_keeps_time_order_and_drops_every_copy_of_the_target():
    loader = object.__new__(TrainLoader)
    loader.rng = np.random.RandomState(0)
    loader.timelines = {"timeline_indptr": np.array([0, 5, 12, 14]),
                        "timeline_items": np.array([10, 11, 12, 11, 14, 20, 21, 22, 23, 24, 25, 26, 30, 31])}
    hist = loader.sample_histories(np.array([0, 1, 2, 1]), np.array([10, 19, 30, 25]), max_len=4)
    assert hist[0].tolist() == [0, 10, 12, 14]                  # both copies of item 10 (code 11) dropped
    assert hist[2].tolist() == [0, 0, 0, 30]                    # target 30 is code 31
    for row, candidates in ((1, {21, 22, 23, 24, 25, 26}), (3, {20, 21, 22, 23, 24, 25})):
        codes = hist[row].tolist()                              # 6 candidates for 4 slots
        assert len(set(codes)) == 4 and codes == sorted(codes) and set(codes) <= candidates
    draws = {tuple(loader.sample_histories(np.array([1]), np.array([19]), max_len=4)[0]) for _ in range(50)}
    assert len(draws) > 5                                       # uniform over the C(6, 4) = 15 subsets


def test_built_train_split_has_every_position_and_static_user_features(tiny):
    train = read_h5(os.path.join(tiny["data_dir"], "train.h5"))
    raw = tiny["raw"]
    inter = pd.read_csv(os.path.join(raw, "interactions.csv")).sort_values(["user_id", "timestamp"], kind="stable")
    users = pd.read_csv(os.path.join(raw, "users.csv")).set_index("user_id")
    items = pd.read_csv(os.path.join(raw, "items.csv"))
    code = {item: row + 1 for row, item in enumerate(items["item_id"].astype(str))}
    train_users = sorted(set(train["raw_user_id"].astype(str)))
    sequences = {u: [code[i] for i in g["item_id"].astype(str)] for u, g in inter.groupby("user_id")}
    assert len(train["item_index"]) == sum(len(sequences[u]) - 2 for u in train_users)   # min_history = 2
    age_vocab = {}
    for row in range(len(train["item_index"])):
        user = str(train["raw_user_id"][row])
        seq = sequences[user]
        hist = [c for c in train[HISTORY_FEATURE][row] if c != 0]
        t = seq.index(int(train["item_index"][row]) + 1)
        assert t >= 2 and hist == seq[max(0, t - MAX_LEN):t]
        # The static feature of the user is attached to every one of its rows (one code per raw value).
        age_vocab.setdefault(users.loc[user, "age_band"], set()).add(int(train["age_band"][row]))
    assert all(len(codes) == 1 for codes in age_vocab.values()) and len(age_vocab) > 1


# ------------------------------------------------------------------ model behaviour
def test_sasrec_output_at_t_ignores_later_items(tiny):
    model = _model(tiny, "SASRec")
    history = [11, 52, 7, 33, 90, 4, 61, 18]                              # positions 2..9 of the window
    changed = history[:5] + [150, 2, 77]                                  # items after t (= position 6) differ
    with torch.no_grad():
        per_position = model.user_vectors_per_position(_user_batch(tiny, [history, changed]))   # [2, L, d]
        user_vectors = model.encode_users(_user_batch(tiny, [history, changed]))               # [2, d]
    t = MAX_LEN - 3 - 1                                                    # last position holding history[4]
    assert torch.allclose(per_position[0, :t + 1], per_position[1, :t + 1], atol=1e-5)
    assert not torch.allclose(per_position[0, t + 1:], per_position[1, t + 1:], atol=1e-3)
    # The served user vector is the output at the last position.
    assert torch.allclose(user_vectors, per_position[:, -1], atol=1e-5)
    assert float(per_position[0, :2].abs().sum()) == 0.0                  # padding positions
    # Training mode (dropout on): the future still cannot leak into position t.
    model.train()
    torch.manual_seed(3)
    first = model.user_vectors_per_position(_user_batch(tiny, [history]))
    torch.manual_seed(3)
    second = model.user_vectors_per_position(_user_batch(tiny, [changed]))
    assert torch.allclose(first[0, :t + 1], second[0, :t + 1], atol=1e-5)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_padding_does_not_change_the_user_vector(tiny, name):
    model = _model(tiny, name)
    history = [11, 52, 7, 33]
    short = _user_batch(tiny, [history])
    short[HISTORY_FEATURE] = short[HISTORY_FEATURE][:, -6:]                # window of 6 instead of 10
    mixed = _user_batch(tiny, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], history, []])
    with torch.no_grad():
        full = model.encode_users(_user_batch(tiny, [history]))
        shorter = model.encode_users(short)
        batched = model.encode_users(mixed)
    assert torch.allclose(full, shorter, atol=1e-5)
    assert torch.allclose(full[0], batched[1], atol=1e-5)                  # independent of batch neighbours
    assert torch.isfinite(batched).all()                                  # an empty history is fine
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)           # the history matters


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_history_shares_item_id_embedding_and_user_features_are_used(tiny, name):
    model = _model(tiny, name)
    batch = _user_batch(tiny, [[11, 52, 7], [11, 52, 7]])
    batch["age_band"][1] = (batch["age_band"][0] % (tiny["feature_map"].features["age_band"]["vocab_size"] - 1)) + 1
    with torch.no_grad():
        before = model.encode_users(batch)
        assert not torch.allclose(before[0], before[1], atol=1e-6)        # static user features enter the tower
        table = model.embedding.embeddings.embedding_layers["item_id"].weight
        # A random change (a constant shift of all dims would vanish in SASRec's layer norms).
        table[52].add_(torch.randn(table.shape[1]))                      # item code 52 = item_index 51
        after = model.encode_users(batch)
    assert not torch.allclose(before, after, atol=1e-4)
    layers = model.embedding.embeddings.embedding_layers
    assert layers[HISTORY_FEATURE] is layers["item_id"]
    blind = _model(tiny, name, use_user_features=False)
    with torch.no_grad():
        vectors = blind.encode_users(batch)
    assert torch.allclose(vectors[0], vectors[1], atol=1e-6)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_history_items_are_masked_at_ranking(tiny, name):
    model = _model(tiny, name)
    valid, n_items = tiny["valid"], tiny["corpus"].num_items
    everything = rank(model, valid, n_items)                          # every retrievable item, best first
    item_repr = model.all_item_repr()
    for u in range(len(valid)):
        history = set(valid.mask_items[valid.mask_indptr[u]:valid.mask_indptr[u + 1]].tolist())
        assert history                                                    # the test has teeth
        ids = everything[u][everything[u] >= 0]
        assert set(ids.tolist()) == set(range(n_items)) - history          # exactly the non-history items
        if u < 5:                                                         # ranked by the model's scores
            with torch.no_grad():
                scores = model.full_scores(valid.batch(u, u + 1), item_repr)[0, torch.as_tensor(ids)]
            assert bool((scores[:-1] >= scores[1:] - 1e-5).all())


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_faiss_flat_ip_returns_the_exact_top_k(tiny, name):
    model = _model(tiny, name)
    train_steps(model, tiny["train"], 3)
    model.eval()
    valid = tiny["valid"]
    exact = rank(model, valid, 20)
    with torch.no_grad():
        items = model.all_item_repr().numpy()                             # [C, d]
        users = model.encode_users(valid.batch(0, len(valid))).numpy()    # [B, d]
        assert np.allclose(model.score_matrix(torch.from_numpy(users), torch.from_numpy(items)).numpy(),
                           users @ items.T, atol=1e-5)
    index = FaissRetriever("flat_ip", dim=items.shape[1])
    index.add(items)
    _, ids = index.search(users, 20, valid.mask_indptr, valid.mask_items)
    scores = users @ items.T
    same = 0
    for u in range(len(valid)):                                           # equal up to float ties at the cut
        if np.array_equal(ids[u], exact[u]):
            same += 1
        else:
            assert np.allclose(np.sort(scores[u, ids[u]]), np.sort(scores[u, exact[u]]), atol=1e-5)
    assert same >= 0.9 * len(valid)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_cosine_similarity_scores_the_cosine_of_the_dot_models_vectors(tiny, name):
    dot, cosine = _model(tiny, name), _model(tiny, name, similarity="cosine")
    cosine.load_state_dict(dot.state_dict())                              # same weights, no extra parameter
    batch = _user_batch(tiny, [[11, 52, 7], [3, 9], []])
    with torch.no_grad():
        users, items = dot.encode_users(batch), dot.all_item_repr()       # [3, d], [C, d]
        expected = torch.nn.functional.cosine_similarity(users.unsqueeze(1), items.unsqueeze(0), dim=-1)
        scores = cosine.full_scores(batch, cosine.all_item_repr())        # [3, C]
    assert torch.allclose(scores[:2], expected[:2], atol=1e-5)
    assert torch.allclose(cosine.all_item_repr().norm(dim=-1), torch.ones(items.shape[0]), atol=1e-5)
    with pytest.raises(ValueError, match="similarity='euclid'"):
        _model(tiny, name, similarity="euclid")


def test_sequential_models_learn_to_lower_the_loss(tiny):
    for name in SEQUENTIAL:
        model = _model(tiny, name)
        optimizer = optimizer_for(model, 1.e-2)
        batch = next(iter(tiny["train"]))
        positives = batch.pop("item_index")
        model.train()
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = model.sampled_softmax_loss(batch, positives)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.85 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


# ------------------------------------------------------------------ layers
def test_towers_validate_shapes_and_arguments():
    tower = FieldMLPTower(num_fields=3, embedding_dim=4, output_dim=5, hidden_units=[])
    assert tower(torch.randn(2, 7, 3, 4)).shape == (2, 7, 5)
    with pytest.raises(ValueError, match=r"F=3, D=4"):
        tower(torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="num_user_fields"):
        SequenceUserTower(GRUEncoder(4, 4), encoder_dim=4, num_user_fields=-1, embedding_dim=4)
    user_tower = SequenceUserTower(GRUEncoder(4, 6), encoder_dim=6, num_user_fields=2, embedding_dim=4,
                                   output_dim=5, hidden_units=[8])
    seq, mask = torch.randn(3, 7, 4), torch.ones(3, 7, dtype=torch.bool)
    assert user_tower(seq, mask, torch.randn(3, 2, 4)).shape == (3, 5)
    with pytest.raises(ValueError, match="user_fields"):
        user_tower(seq, mask, None)
    with pytest.raises(ValueError, match="input_scale"):
        SequenceUserTower(GRUEncoder(4, 4), encoder_dim=4, input_scale=0.0)


def test_demo_expids_define_the_sequential_models():
    config = os.path.join(os.path.dirname(__file__), "..", "config")
    for name in SEQUENTIAL:
        params = load_config(config, f"{name}_demo_001")
        assert params["model"] == name and params["dataset_id"] == "demo"
    assert load_config(config, "SASRec_demo_001")["num_layers"] == 3
