"""One parametrized test over the model registry (every model of model_zoo.MODELS, built from its demo expid),
plus two-tower serving and checkpoint checks."""
import os

import numpy as np
import pytest
import torch

from model_zoo import MODELS, get_model
from model_zoo.base import ClosedForm
from model_zoo.config import load_config
from model_zoo.engine.evaluator import Evaluator
from model_zoo.engine.trainer import Trainer
from model_zoo.retrieval.faiss_index import FaissRetriever

from .conftest import open_tiny, write_config

REPO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "config")
SHRINK = {"embedding_dim": 16, "hidden_units": [16], "user_hidden_units": [16], "item_hidden_units": [16],
          "token_dim": 16, "num_negatives": 10, "batch_size": 32}
EVALUATOR = Evaluator(["Recall(k=20)", "NDCG(k=20)"], eval_batch_size=64, verbose=False)


def _tiny_model(tmp_path, tiny_raw, name, **overrides):
    """The model's demo expid, moved onto the tiny dataset and shrunk (then `overrides` applied)."""
    entry = {k: v for k, v in load_config(REPO_CONFIG, f"{name}_demo_001").items()}
    keep = {k: v for k, v in entry.items() if k in _own_keys(name) or k in ("model", "negative_sampler")}
    keep.update({k: v for k, v in SHRINK.items() if k in _own_keys(name) or k in ("num_negatives", "batch_size")})
    keep["dataset_id"] = "tiny"
    keep.update(overrides)
    config = write_config(str(tmp_path), tiny_raw, {"X_tiny": keep})
    data = open_tiny(config, "X_tiny")
    torch.manual_seed(0)
    model = get_model(name)(data["feature_map"], **data["params"])
    model.set_item_corpus(data["corpus"], data["train"].item_counts(data["corpus"].num_items))
    return model, data["train"], data["valid"]


def _own_keys(name):
    import inspect
    keys = set()
    for cls in get_model(name).__mro__:
        if "__init__" in cls.__dict__:
            keys |= set(inspect.signature(cls.__init__).parameters)
    return keys - {"self", "feature_map", "kwargs"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_trains_and_evaluates(name, tmp_path, tiny_raw):
    """Every registered model: built from `<name>_demo_001`, a forward and backward pass give every trainable
    parameter a finite gradient, and evaluation ranks no history item."""
    model, train, valid = _tiny_model(tmp_path, tiny_raw, name)
    batch = next(iter(train))
    positives = batch.pop("item_index")
    if model.trainable:
        model.train()
        loss = model.sampled_softmax_loss(batch, positives)
        assert torch.isfinite(loss)
        loss.backward()
        trainable = [(pname, param) for pname, param in model.named_parameters() if param.requires_grad]
        assert trainable, f"{name}: no trainable parameter"
        for pname, param in trainable:
            assert param.grad is not None, f"{name}: {pname} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a NaN gradient"
    if isinstance(model, ClosedForm):
        model.fit_closed_form(train)
        assert all(torch.isfinite(b).all() for b in model.buffers()), f"{name}: a NaN in the fitted buffers"
    metrics = EVALUATOR.evaluate(model, valid)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    topk = EVALUATOR.rank(model, valid, 20)
    for u in range(len(valid)):
        seen = set(valid.mask_items[valid.mask_indptr[u]:valid.mask_indptr[u + 1]])
        assert not seen & set(topk[u]), f"{name}: a history item was retrieved"


def test_unknown_hyperparameter_raises_naming_it(tmp_path, tiny_raw):
    model, _, _ = _tiny_model(tmp_path, tiny_raw, "DSSM")
    with pytest.raises(ValueError, match="hidden_unitz"):
        get_model("DSSM")(model.feature_map, hidden_unitz=[3])


def test_dssm_faiss_flat_ip_equals_exact_scoring(tmp_path, tiny_raw):
    model, train, valid = _tiny_model(tmp_path, tiny_raw, "DSSM")
    Trainer(model, EVALUATOR, epochs=1, max_steps_per_epoch=5, verbose=False).fit(train, resume=False)
    model.eval()
    exact = EVALUATOR.rank(model, valid, 20)
    with torch.no_grad():
        items = model.all_item_repr().numpy()
        users = model.encode_users(valid.batch(0, len(valid))).numpy()
    index = FaissRetriever("flat_ip", dim=items.shape[1])
    index.add(items)
    _, ids = index.search(users, 20, valid.mask_indptr, valid.mask_items)
    scores = users @ items.T
    for u in range(len(valid)):      # equal sets up to float ties at the boundary
        if not np.array_equal(ids[u], exact[u]):
            assert np.allclose(np.sort(scores[u, ids[u]]), np.sort(scores[u, exact[u]]), atol=1e-5)


def test_checkpoint_round_trip_and_corrupt_file(tmp_path, tiny_raw):
    model, _, valid = _tiny_model(tmp_path, tiny_raw, "DSSM")
    model.save_weights(model.checkpoint)
    before = EVALUATOR.evaluate(model, valid)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert EVALUATOR.evaluate(model, valid) != before
    model.load_weights(model.checkpoint)
    assert EVALUATOR.evaluate(model, valid) == before
    with open(model.checkpoint, "wb") as fd:
        fd.write(b"garbage")
    with pytest.raises(ValueError, match=os.path.basename(model.checkpoint)):
        model.load_weights(model.checkpoint)


@pytest.mark.parametrize("name", sorted(n for n in MODELS if get_model(n).trainable))
def test_embedding_init_std_sets_the_feature_embedding_scale(name, tmp_path, tiny_raw):
    for std in (1.e-4, 5.e-2):
        model, _, _ = _tiny_model(tmp_path / str(std), tiny_raw, name, embedding_init_std=std)
        table = model.embedding.embeddings.embedding_layers["item_id"].weight.detach()[1:]   # row 0: padding
        assert abs(float(table.std()) - std) < 0.25 * std, (name, std, float(table.std()))
    with pytest.raises(ValueError, match="init_std=0"):
        _tiny_model(tmp_path / "bad", tiny_raw, name, embedding_init_std=0)
