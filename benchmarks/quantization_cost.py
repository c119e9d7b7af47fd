"""What SparCode's quantizer costs: exact Recall of a trained checkpoint scored with its quantized tokens
(the codes the index serves) and with the unquantized tokens the tokenizer produced.

Both variants use the same trained tokenizer, item encoder, scorer and sparse bias b (Eq. 10-11:
sum_k relu(S(token_k, item) + b)) and the models' evaluation protocol (history masked, every item ranked).
The quantized variant must reproduce the engine's exact evaluation (Evaluator, checked). Needs a trained checkpoint:

    python run_expid.py --expid SparCode_demo_sample
    python benchmarks/quantization_cost.py --expid SparCode_demo_sample

Writes benchmarks/results/quantization_cost.md (or --out).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_zoo import get_model  # noqa: E402
from model_zoo.base import CodeIndexable  # noqa: E402
from model_zoo.config import load_config  # noqa: E402
from model_zoo.engine.evaluator import Evaluator  # noqa: E402
from model_zoo.engine.experiment import open_data  # noqa: E402
from model_zoo.retrieval.exact import masked_topk  # noqa: E402
from model_zoo.retrieval.metrics import topk_metrics  # noqa: E402

KS = (20, 50)
OUTPUT = os.path.join(ROOT, "benchmarks", "results", "quantization_cost.md")


def recall(model, users, items, quantize, batch_size=256):
    """{Recall(k=...): value} of the held-out `users`, tokens quantized or not."""
    tops = []
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            tokens = model.user_tokens(users.batch(start, min(start + batch_size, len(users))))  # [B, K_u, D_T]
            if quantize:
                tokens = model.quantizer.decode(model.quantizer.encode(tokens))
            scores = model.score_tokens(tokens, items)                                            # [B, C]
            _, top = masked_topk(scores, max(KS), users.mask_indptr, users.mask_items, row_offset=start)
            tops.append(top)
    return topk_metrics(torch.cat(tops).numpy(), users.gt_indptr, users.gt_items, ks=KS, metrics=("Recall",))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "config"))
    parser.add_argument("--expid", default="SparCode_demo_sample")
    parser.add_argument("--out", default=OUTPUT)
    args = parser.parse_args(argv)
    params = load_config(args.config, args.expid)
    _, feature_map, corpus, train, valid, test = open_data(params)
    model = get_model(params["model"])(feature_map, **params)
    if not isinstance(model, CodeIndexable):
        raise ValueError(f"{args.expid}: model={params['model']!r}; this benchmark needs a SparCode expid")
    if not os.path.exists(model.checkpoint):
        raise FileNotFoundError(f"{model.checkpoint}: no checkpoint; run `python run_expid.py --expid {args.expid}`")
    model.set_item_corpus(corpus, train.item_counts(corpus.num_items))
    model.load_weights(model.checkpoint)
    model.eval()
    items = model.all_item_repr()                                                                 # [C, K_c, D_T]
    rows = {}
    for name, users in (("valid", valid), ("test", test)):
        for quantize in (True, False):
            label = "quantized tokens (the served codes)" if quantize else "unquantized tokens"
            metrics = recall(model, users, items, quantize)
            rows.setdefault(label, {}).update({f"{name} R@{k}": metrics[f"Recall(k={k})"] for k in KS})
    reference = Evaluator(["Recall(k=50)"], params["precision_denominator"], params["eval_batch_size"],
                          verbose=False).evaluate(model, test)["Recall(k=50)"]
    got = rows["quantized tokens (the served codes)"]["test R@50"]
    if abs(reference - got) > 1e-6:
        raise RuntimeError(f"quantized scoring gives test Recall@50 {got:.6f}, the Evaluator {reference:.6f}")
    command = f"python benchmarks/quantization_cost.py --expid {args.expid}"
    if os.path.abspath(args.out) != OUTPUT:
        command += f" --out {os.path.relpath(args.out, ROOT)}"
    columns = [f"{s} R@{k}" for s in ("valid", "test") for k in KS]
    lines = [f"# Cost of SparCode's quantizer: {args.expid}", "",
             f"From `{command}` on the checkpoint "
             f"`{os.path.relpath(model.checkpoint, ROOT)}` (module docstring). The quantized row reproduces "
             f"the exact evaluation (test Recall@50 {reference:.4f}).", "",
             "| tokens | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |" for label, row in rows.items()]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        fd.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
