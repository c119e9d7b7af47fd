"""Training schedules and statistics of one model kind, as Trainer callbacks chosen in the expid.

An expid lists them under `callbacks`, a mapping of callback name -> its keyword arguments, merged over
the model class's `default_callbacks`:

    callbacks:
      quantizer_warmup: {steps: 7300}
      freeze_codes: {after_steps: 7300}

A callback keeps no state of its own that a resumed run would lose: schedules read the Trainer's
`global_step` (saved with the training state), statistics restart with each epoch.
"""
import inspect
import logging

import torch

from ..base import CodeIndexable


class Callback:
    """Hooks called by the Trainer. `trainer.global_step` counts the optimizer steps done so far.

    A subclass sets `name` (its key under `callbacks:`), `needs_codes` (it applies only to CodeIndexable
    models) and a `check(**arguments)` classmethod that validates its arguments without a model, so that
    a bad value fails when the expid loads.
    """
    name = None
    needs_codes = False

    @classmethod
    def check(cls):
        """Validate the callback's arguments (no model needed); raises ValueError naming the bad one."""

    def on_train_begin(self, trainer):
        pass

    def on_step_begin(self, trainer):
        pass

    def on_step_end(self, trainer):
        pass

    def on_epoch_end(self, trainer, record):
        """Add statistics of the epoch to `record` (the epoch's log line and history entry)."""


def _non_negative_int(callback, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"callbacks.{callback}.{name}={value!r}; expected an int >= 0")
    return value


def _positive_int(callback, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"callbacks.{callback}.{name}={value!r}; expected an int >= 1")
    return value


def _check_model(callback, model_cls):
    if callback.needs_codes and not issubclass(model_cls, CodeIndexable):
        raise ValueError(f"callbacks.{callback.name}: model {model_cls.__name__} has no product quantizer; "
                         f"this callback applies to code-indexable models (SparCode)")


class QuantizerWarmup(Callback):
    """For the first `steps` training steps the scorer is fed the unquantized user tokens.

    The quantizer still runs and its codebooks follow the tokens; evaluation always uses the codes.

    Args:
        steps: length of the warm-up in optimizer steps; 0 quantizes from the first step (the paper).
    """
    name, needs_codes = "quantizer_warmup", True

    @classmethod
    def check(cls, steps=0):
        _non_negative_int(cls.name, "steps", steps)

    def __init__(self, model, steps=0):
        self.check(steps)
        self.model, self.steps = model, steps

    def on_step_begin(self, trainer):
        self.model.feed_unquantized_tokens = trainer.global_step < self.steps

    on_train_begin = on_step_begin      # a resumed run starts in the phase of its saved global step


class FreezeCodes(Callback):
    """After `after_steps` steps the user side is frozen and only the item side and b train.

    The field embeddings (shared with the item side), the tokenizer and the codebooks stop changing, so every
    user keeps its codes; the item encoder, item heads, scorer and b train on the quantized tokens.

    Args:
        after_steps: optimizer steps before the freeze (> 0; usually the quantizer warm-up's length).
    """
    name, needs_codes = "freeze_codes", True

    @classmethod
    def check(cls, after_steps):
        _positive_int(cls.name, "after_steps", after_steps)

    def __init__(self, model, after_steps):
        self.check(after_steps)
        self.model, self.after_steps = model, after_steps

    def on_step_begin(self, trainer):
        if trainer.global_step >= self.after_steps and not self.model.codes_frozen:
            self.model.freeze_user_side()
            logging.info(f"step {trainer.global_step}: user side frozen (embeddings, tokenizer, codebooks); "
                         f"the item side and b now train on the quantized tokens")

    on_train_begin = on_step_begin      # a resumed run starts in the phase of its saved global step


class SparsityWarmup(Callback):
    """Ramps the share of zeroed training scores from 0 to the model's `train_sparsity` over `steps` steps.

    The share of positive scores falls geometrically, (1 - train_sparsity) ** (step / steps), so the threshold
    rises slowly through the dense phase where the positives are learned, and reaches the target at `steps`.
    Without this callback a model with train_sparsity applies it from the first step.

    Args:
        steps: length of the ramp in optimizer steps (> 0).
    """
    name, needs_codes = "sparsity_warmup", True

    @classmethod
    def check(cls, steps):
        _positive_int(cls.name, "steps", steps)

    def __init__(self, model, steps):
        self.check(steps)
        if getattr(model, "train_sparsity", None) is None:
            raise ValueError(f"callbacks.{self.name}: the model has no train_sparsity to ramp up to; set "
                             f"train_sparsity in the expid")
        self.model, self.steps = model, steps

    def on_step_begin(self, trainer):
        progress = min(1.0, trainer.global_step / self.steps)
        self.model.current_sparsity = 1.0 - (1.0 - self.model.train_sparsity) ** progress

    on_train_begin = on_step_begin


class CodebookStats(Callback):
    """Codebook usage and sparse-score statistics of the training steps of each epoch.

    Adds to the epoch record: per-codebook perplexity, dead codewords, restarts, distinct full codes, mean raw
    commitment, the share of relu(S + b) scores at zero, and b.
    """
    name, needs_codes = "codebook_stats", True

    def __init__(self, model):
        self.model = model
        self._reset()

    def _reset(self):
        self.keys, self.commitment, self.zero_scores, self.scores = [], [], 0, 0

    def on_step_end(self, trainer):
        stats = self.model.step_stats
        self.keys.append(torch.unique(stats["keys"]))
        if len(self.keys) >= 64:
            self.keys = [torch.unique(torch.cat(self.keys))]
        self.commitment.append(stats["commitment"])
        self.zero_scores += stats["zero_scores"]
        self.scores += stats["scores"]

    def on_epoch_end(self, trainer, record):
        usage = self.model.quantizer.codebook_usage(reset=True)
        keys = torch.unique(torch.cat(self.keys)) if self.keys else torch.zeros(0)
        record.update({"codebook_perplexity": [round(p, 2) for p in usage["perplexity"]],
                       "dead_codewords": usage["dead_codewords"], "codeword_restarts": usage["restarts"],
                       "distinct_codes": int(keys.numel()),
                       "commitment": round(sum(self.commitment) / max(len(self.commitment), 1), 5),
                       "zero_score_fraction": round(self.zero_scores / max(self.scores, 1), 4),
                       "sparse_bias": round(self.model.sparse_bias, 5)})
        self._reset()


CALLBACKS = {cls.name: cls for cls in (QuantizerWarmup, FreezeCodes, SparsityWarmup, CodebookStats)}


def _enabled(spec, source=""):
    """(name, arguments) of the enabled callbacks of a spec; a name set to null turns a default off."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise ValueError(f"{source}callbacks={spec!r}; expected a mapping of callback name -> arguments")
    enabled = []
    for name, arguments in spec.items():
        if name not in CALLBACKS:
            raise ValueError(f"{source}callbacks: unknown callback {name!r}; known callbacks: "
                             f"{', '.join(sorted(CALLBACKS))}")
        if arguments is None:
            continue
        if not isinstance(arguments, dict):
            raise ValueError(f"{source}callbacks.{name}={arguments!r}; expected a mapping of its arguments")
        enabled.append((name, arguments))
    return enabled


def check_callbacks(spec, model_cls, source=""):
    """Everything about a `callbacks` spec that can be checked before data is built: the names, the argument
    names and values, and that the model class has what each callback needs."""
    for name, arguments in _enabled(spec, source):
        callback = CALLBACKS[name]
        _check_model(callback, model_cls)
        try:
            inspect.signature(callback.check).bind(**arguments)
        except TypeError as exc:
            expected = [p for p in inspect.signature(callback.check).parameters]
            raise ValueError(f"{source}callbacks.{name}: {exc}; expected arguments {expected}") from None
        try:
            callback.check(**arguments)
        except ValueError as exc:
            raise ValueError(f"{source}{exc}") from None


def build_callbacks(model, spec=None):
    """Callbacks of an expid: the model class's `default_callbacks` updated by `spec` (name -> arguments);
    a name set to null turns a default callback off."""
    merged = dict(model.default_callbacks)
    merged.update(spec or {})
    check_callbacks(merged, type(model))
    return [CALLBACKS[name](model, **arguments) for name, arguments in _enabled(merged)]
