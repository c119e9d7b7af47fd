"""The engine: Trainer (resume of a killed run), callbacks (quantizer warm-up, frozen codes, codebook
statistics), the Evaluator, and logs that stay small when written to a file."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from model_zoo.engine.callbacks import (CALLBACKS, CodebookStats, FreezeCodes, QuantizerWarmup, SparsityWarmup,
                                        build_callbacks, check_callbacks)
from model_zoo.engine.evaluator import Evaluator
from model_zoo.engine.trainer import Trainer
from model_zoo.models.dssm import DSSM
from model_zoo.models.sparcode import SparCode

from .conftest import open_tiny, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SPARCODE = {"model": "SparCode", "dataset_id": "tiny", "embedding_dim": 8, "token_dim": 8,
                  "num_query_tokens": 2, "num_item_tokens": 2, "num_codebooks": 2, "codebook_size": 8,
                  "hidden_units": [8], "tokenizer_hidden_units": [16], "net_dropout": 0.5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_raw):
    root = tmp_path_factory.mktemp("engine")
    config = write_config(str(root), tiny_raw, {"SparCode_tiny": SMALL_SPARCODE})
    return open_tiny(config, "SparCode_tiny", batch_size=32)


def _sparcode(tiny, seed=0):
    torch.manual_seed(seed)
    params = dict(tiny["params"], num_negatives=10)
    model = SparCode(tiny["feature_map"], **params)
    model.set_item_corpus(tiny["corpus"], tiny["train"].item_counts(tiny["corpus"].num_items))
    return model


def _trainer(model, callbacks, **kwargs):
    return Trainer(model, Evaluator(["Recall(k=20)"], eval_batch_size=64, verbose=False), callbacks,
                   verbose=False, **kwargs)


# ---- callbacks --------------------------------------------------------------------------

def test_quantizer_warmup_feeds_unquantized_tokens_then_codes(tiny):
    model = _sparcode(tiny)
    trainer = _trainer(model, [QuantizerWarmup(model, steps=2)])
    batch = {k: v for k, v in next(iter(tiny["train"])).items() if k != "item_index"}
    model.train()
    seen = []
    for step in range(4):
        trainer.global_step = step
        trainer.callbacks[0].on_step_begin(trainer)
        codebooks = model.quantizer.codebooks.clone()                    # [M, N, d] before this step's EMA update
        quantized, keys = model.encode_users(batch)                      # [B, K_u, D_T], [B, K_u]
        codes = model.quantizer.unpack_keys(keys)                        # [B, K_u, M]
        codewords = torch.cat([codebooks[m][codes[..., m]] for m in range(codebooks.shape[0])], -1)
        seen.append(torch.allclose(quantized, codewords, atol=1e-6))
    assert seen == [False, False, True, True]


def test_sparsity_warmup_ramps_the_zeroed_share_geometrically(tiny):
    torch.manual_seed(0)
    model = SparCode(tiny["feature_map"], **dict(tiny["params"], num_negatives=10, train_sparsity=0.99,
                                                   token_norm="l2"))
    trainer = _trainer(model, [SparsityWarmup(model, steps=10)])
    shares = []
    for step in (0, 5, 10, 20):
        trainer.global_step = step
        trainer.callbacks[0].on_step_begin(trainer)
        shares.append(model.current_sparsity)
    assert shares == pytest.approx([0.0, 0.9, 0.99, 0.99])


def test_freeze_codes_trains_only_the_item_side(tiny):
    model = _sparcode(tiny)
    callbacks = [QuantizerWarmup(model, steps=2), FreezeCodes(model, after_steps=2)]
    trainer = _trainer(model, callbacks, epochs=1, max_steps_per_epoch=2)
    trainer.train_epoch(tiny["train"])                           # 2 warm-up steps: everything trains
    assert not model.codes_frozen
    user_side = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("embedding",
                                                                                              "tokenizer"))}
    codebooks = model.quantizer.codebooks.clone()
    item_side = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("item_heads",
                                                                                              "scorer"))}
    trainer.train_epoch(tiny["train"])                           # steps 2-3: frozen user side
    assert model.codes_frozen and not model.tokenizer.training
    for name, value in model.named_parameters():
        if name in user_side:
            assert torch.equal(value, user_side[name]), name
    assert torch.equal(model.quantizer.codebooks, codebooks)
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in item_side.items())


def test_codebook_stats_report_the_epoch_and_reset(tiny):
    model = _sparcode(tiny)
    (stats,) = build_callbacks(model)                            # SparCode's default callback
    assert isinstance(stats, CodebookStats)
    trainer = _trainer(model, [stats], epochs=1, max_steps_per_epoch=3)
    trainer.train_epoch(tiny["train"])
    record = {}
    stats.on_epoch_end(trainer, record)
    assert 1 <= record["distinct_codes"] <= 64
    assert len(record["codebook_perplexity"]) == 2 and record["commitment"] > 0
    assert 0.0 <= record["zero_score_fraction"] <= 1.0
    empty = {}
    stats.on_epoch_end(trainer, empty)
    assert empty["distinct_codes"] == 0


def test_callback_errors_name_the_callback_and_the_known_ones(tiny):
    model = _sparcode(tiny)
    with pytest.raises(ValueError, match="unknown callback 'warmup'.*quantizer_warmup"):
        build_callbacks(model, {"warmup": {"steps": 3}})
    with pytest.raises(ValueError, match="callbacks.quantizer_warmup.steps=-1"):
        build_callbacks(model, {"quantizer_warmup": {"steps": -1}})
    # checked at load, without a model: argument names, required arguments, values, the model's capability
    with pytest.raises(ValueError, match="unexpected keyword argument 'after'"):
        check_callbacks({"freeze_codes": {"after_steps": 3, "after": 3}}, SparCode)
    with pytest.raises(ValueError, match="missing a required argument: 'after_steps'"):
        check_callbacks({"freeze_codes": {}}, SparCode)
    with pytest.raises(ValueError, match="callbacks.quantizer_warmup.steps=2.5"):
        check_callbacks({"quantizer_warmup": {"steps": 2.5}}, SparCode)
    with pytest.raises(ValueError, match="DSSM has no product quantizer"):
        check_callbacks({"quantizer_warmup": {"steps": 3}}, DSSM)
    assert build_callbacks(model, {"codebook_stats": None}) == []   # a default turned off
    dssm = DSSM(tiny["feature_map"], embedding_dim=8, user_hidden_units=[8], item_hidden_units=[8])
    with pytest.raises(ValueError, match="no product quantizer"):
        build_callbacks(dssm, {"quantizer_warmup": {"steps": 3}})
    with pytest.raises(ValueError, match="no train_sparsity to ramp up to"):
        build_callbacks(model, {"sparsity_warmup": {"steps": 3}})
    assert set(CALLBACKS) == {"quantizer_warmup", "freeze_codes", "sparsity_warmup", "codebook_stats"}


# ---- resume -------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from model_zoo.engine.callbacks import Callback
    from model_zoo.engine.experiment import run_experiment

    class KillAt(Callback):
        def on_step_begin(self, trainer):
            if trainer.global_step == {kill_step}:
                os.kill(os.getpid(), signal.SIGKILL)

    extra = [KillAt()] if {kill} else []
    run_experiment({config!r}, {expid!r}, extra_callbacks=extra)
""")


def _run(config, expid, cwd, kill_step=None):
    script = KILL_SCRIPT.format(root=ROOT, kill_step=kill_step, kill=kill_step is not None, config=config,
                                expid=expid)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)


def test_killed_run_resumes_to_the_same_metrics(tmp_path, tiny_raw):
    """SIGKILL in the second epoch, rerun: same test metrics as an uninterrupted run (one thread, same seed)."""
    expid = "SparCode_resume"
    entry = dict(SMALL_SPARCODE, epochs=3, max_steps_per_epoch=4, early_stop_patience=3,
                 callbacks={"quantizer_warmup": {"steps": 3}, "freeze_codes": {"after_steps": 3}})
    results = {}
    for name, kill_step in (("straight", None), ("killed", 6)):   # epoch 2 is steps 4-7, after the freeze
        root = tmp_path / name
        config = write_config(str(root), tiny_raw, {expid: entry})
        if kill_step is not None:
            killed = _run(config, expid, root, kill_step)
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
            state = torch.load(root / "checkpoints" / "tiny" / f"{expid}.state.pt", weights_only=False)
            assert state["epoch"] == 1 and state["global_step"] == 4 and not state["finished"]
        done = _run(config, expid, root)
        assert done.returncode == 0, done.stderr[-2000:]
        with open(root / "checkpoints" / "tiny" / f"{expid}.json") as fd:
            results[name] = json.load(fd)
    assert [h["epoch"] for h in results["killed"]["history"]] == [1, 2, 3]
    assert results["killed"]["test"] == results["straight"]["test"]
    assert results["killed"]["valid"] == results["straight"]["valid"]
    assert [h["loss"] for h in results["killed"]["history"]] == [h["loss"] for h in results["straight"]["history"]]
    rerun = _run(config, expid, root)                                   # finished: evaluated again, not trained
    assert rerun.returncode == 0 and "[Epoch" not in rerun.stderr, rerun.stderr[-2000:]
    with open(root / "checkpoints" / "tiny" / f"{expid}.json") as fd:
        assert json.load(fd)["test"] == results["straight"]["test"]


def test_state_of_another_config_is_not_resumed(tiny, tmp_path):
    model = _sparcode(tiny)
    state_path = str(tmp_path / "x.state.pt")
    trainer = _trainer(model, [], epochs=1, max_steps_per_epoch=2, state_path=state_path, fingerprint="a")
    model.model_dir, model.checkpoint = str(tmp_path), str(tmp_path / "x.model")
    trainer.fit(tiny["train"])
    assert os.path.exists(state_path)
    again = _trainer(model, [], epochs=1, state_path=state_path, fingerprint="a")
    assert again.resume(tiny["train"]) and again.finished
    other = _trainer(model, [], epochs=1, state_path=state_path, fingerprint="b")
    assert not other.resume(tiny["train"]) and other.epoch == 0


# ---- logs ---------------------------------------------------------------------------------

def test_log_written_to_a_file_has_no_progress_frames(tmp_path, tiny_raw):
    """verbose on, stderr to a file: no tqdm frames, a line per epoch plus the summaries."""
    config = write_config(str(tmp_path), tiny_raw, {"DSSM_log": {"model": "DSSM", "dataset_id": "tiny",
                                                                 "user_hidden_units": [16], "verbose": 1,
                                                                 "epochs": 2}})
    log = tmp_path / "run.log"
    with open(log, "w") as fd:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "run_expid.py"), "--config", config,
                              "--expid", "DSSM_log"], cwd=tmp_path, stdout=fd, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    text = log.read_text()
    assert out.returncode == 0, text[-2000:]
    assert "\r" not in text and "it/s" not in text
    assert "[Epoch 1/2]" in text and "[Epoch 2/2]" in text and len(text.splitlines()) < 60
