"""TDM (Zhu et al., KDD 2018): items are the leaves of a balanced tree, every internal node has an embedding,
and retrieval is a layer-wise beam search from the root (the SparCode paper's Sec. 4.5 comparator).

user -> FieldEmbedding -> FieldMLPTower (DSSM's user tower) -> u [B, d]; node n -> e_n [d]: an internal node's
embedding (levels 1..D-1), a leaf's item tower output over the item's fields (level D); score(u, n) = <u, e_n>
(`dot`) or MLP([u; e_n]) (`mlp`). Training row (user, item): at every level 1..D the item's ancestor is the
positive and `layer_negatives` other nodes of the level, drawn uniformly (every other node of a small level),
are the negatives; a softmax (`tdm_loss: softmax`) or binary cross-entropy (`bce`) per level, summed.
Evaluation scores every leaf (full ranking); serving (engine/serving.py) searches the tree. The tree
(layers/tree.py) is random or built by balanced k-means over a trained two-tower model's item vectors;
`tree_learning_rounds` rebuilds it from the model's own item vectors during training (the second stage of
JTM, Zhu et al. NeurIPS 2019, with balanced k-means as the assignment) and training goes on with it. The
leaf order is a buffer of the state dict, so a checkpoint carries its tree; save_weights also writes it to
`<expid>.tree.npz` with the checkpoint's sha256.
"""
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base import MatchModel, TreeRetrievable, VectorServable
from ..layers.field_embedding import FieldEmbedding
from ..layers.interaction import InteractionScorer
from ..layers.towers import FieldMLPTower
from ..layers.tree import BalancedTree, tree_depth, tree_file
from ..retrieval.index_io import file_sha256

INTERACTIONS = {"dot": "dot", "mlp": "dnn"}          # TDM's name -> the layers/interaction.py scorer
TDM_LOSSES = ("softmax", "bce")


class TDM(MatchModel, TreeRetrievable):
    """Tree-based deep model: DSSM's user tower, an embedding per internal tree node, items (the leaves) encoded
    by an item tower over their fields.

    Args:
        feature_map: FuxiCTR FeatureMap.
        model_id: experiment id.
        embedding_dim: field embedding size D.
        output_dim: size d of the user vector and of every node vector (default: embedding_dim).
        user_hidden_units: hidden layers of the user tower.
        item_hidden_units: hidden layers of the item tower that gives a leaf (item) its vector.
        hidden_activations: activation of the towers and of the `mlp` interaction.
        net_dropout: dropout rate of the towers and of the `mlp` interaction.
        batch_norm: batch normalisation in the towers.
        interaction: `dot` (<u, e_n>) or `mlp` (an MLP over [u; e_n]).
        hidden_units: hidden layers of the `mlp` interaction.
        tree_branching: most children per tree node (2: a binary tree).
        tree_init_expid: a trained two-tower expid (DSSM, GRU4Rec, SASRec) on the same dataset whose item vectors
            build the tree by balanced k-means at the first training step; its `<model_root>/<dataset_id>/<expid>.json`
            and checkpoint must exist then. null = a random tree.
        layer_negatives: negatives per level, drawn with replacement among the other nodes of the level (all of
            them when the level has no more): one int for every level, or a list of D counts from level 1 (the
            root's children) to the leaves; 0 leaves a level out of the loss.
        tdm_loss: `softmax` or `bce`, per level.
        tree_learning_rounds: times the tree is rebuilt from the learned item vectors during training (0: never).
        tree_learning_steps: optimizer steps before each rebuild (needed when tree_learning_rounds > 0).
        **kwargs: MatchModel arguments.
    """

    def __init__(self, feature_map, model_id="TDM", embedding_dim=64, output_dim=None, user_hidden_units=(256,),
                 item_hidden_units=(256,), hidden_activations="ReLU", net_dropout=0.0, batch_norm=False,
                 interaction="mlp", hidden_units=(64,), tree_branching=2, tree_init_expid=None, layer_negatives=10,
                 tdm_loss="softmax", tree_learning_rounds=0, tree_learning_steps=None, **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        for name, value, allowed in (("interaction", interaction, INTERACTIONS), ("tdm_loss", tdm_loss, TDM_LOSSES)):
            if value not in allowed:
                raise ValueError(f"TDM: {name}={value!r}; expected one of {list(allowed)}")
        _check_int("tree_branching", tree_branching, 2)
        _check_int("tree_learning_rounds", tree_learning_rounds, 0)
        if tree_learning_rounds:
            _check_int("tree_learning_steps", tree_learning_steps, 1)
        if tree_init_expid is not None and (not isinstance(tree_init_expid, str) or not tree_init_expid):
            raise ValueError(f"TDM: tree_init_expid={tree_init_expid!r}; expected null or an expid")
        num_items = feature_map.features["item_id"]["vocab_size"] - 1
        self.layer_negatives = _layer_counts(layer_negatives, tree_depth(num_items, tree_branching))
        self.tdm_loss, self.tree_init_expid = tdm_loss, tree_init_expid
        self.tree_learning_rounds, self.tree_learning_steps = tree_learning_rounds, tree_learning_steps
        output_dim = output_dim or embedding_dim
        self.embedding = FieldEmbedding(feature_map, embedding_dim, self.embedding_init_std, self.history_features)
        self.user_tower = FieldMLPTower(self.embedding.num_fields("user"), embedding_dim, output_dim,
                                        user_hidden_units, hidden_activations, net_dropout, batch_norm)
        self.item_tower = FieldMLPTower(self.embedding.num_fields("item"), embedding_dim, output_dim,
                                        item_hidden_units, hidden_activations, net_dropout, batch_norm)
        self.tree = BalancedTree.random(num_items, tree_branching, self.seed)
        self.node_embedding = nn.Embedding(max(int(self.tree.level_sizes[1:-1].sum()), 1), output_dim)
        self.scorer = InteractionScorer(output_dim, 1, INTERACTIONS[interaction], hidden_units, hidden_activations,
                                        net_dropout)
        self.register_buffer("leaf_items", torch.from_numpy(self.tree.leaf_items.copy()))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("_offsets", torch.from_numpy(np.cumsum(np.r_[0, self.tree.level_sizes[1:-1]])),
                             persistent=False)                         # first embedding row of levels 1..D-1
        self.register_buffer("_paths", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._use_tree(BalancedTree(
            num_items, tree_branching, module.leaf_items.cpu().numpy())))
        self.reset_parameters()
        nn.init.normal_(self.node_embedding.weight, std=self.embedding_init_std)
        self.model_to_device()
        self._use_tree(self.tree)

    def _use_tree(self, tree):
        """Take `tree`: the leaf-order buffer and every item's path (node ids per level) follow it."""
        self.tree = tree
        self.leaf_items.copy_(torch.from_numpy(tree.leaf_items))
        self._paths = torch.from_numpy(tree.item_paths()).to(self.leaf_items.device)            # [n_items, D]

    # ---- towers and scores ----------------------------------------------------------------
    def encode_users(self, inputs):
        return self.user_tower(self.embedding.fields(inputs, "user"))                      # [B, d]

    def encode_items(self, inputs):
        return self.item_tower(self.embedding.fields(inputs, "item"))                      # [C, d] leaf vectors

    def score_pairs(self, user_repr, item_repr):
        return self.scorer(user_repr.unsqueeze(1), item_repr.unsqueeze(-2))               # [B, C]

    def score_matrix(self, user_repr, item_repr):
        return self.scorer.all_pairs(user_repr, item_repr.unsqueeze(1))                   # [B, C]

    def node_vectors(self, level, nodes, item_repr=None):
        """Vectors [..., d] of level-`level` nodes [...]: an internal node's embedding, a leaf's item vector
        (read from item_repr [n_items, d] when given, else encoded)."""
        if level < self.tree.depth:
            return self.node_embedding(self._offsets[level - 1] + nodes)
        items = self.leaf_items[nodes]
        if item_repr is not None:
            return item_repr[items]
        unique, inverse = torch.unique(items, return_inverse=True)
        return self.encode_items(self.items(unique))[inverse]

    def score_nodes(self, user_repr, level, nodes, item_repr=None):
        return self.score_pairs(user_repr, self.node_vectors(level, nodes.to(self.device), item_repr))  # [B, C]

    # ---- training -----------------------------------------------------------------------
    def loss(self, batch):
        """The training step's loss; the first step builds the tree from `tree_init_expid`, every
        `tree_learning_steps` steps (up to `tree_learning_rounds` times) the tree is rebuilt by learn_tree."""
        step, every = int(self.steps_done), self.tree_learning_steps
        if step == 0 and self.tree_init_expid is not None:
            vectors = two_tower_item_vectors(self, self.tree_init_expid)                    # [n_items, d']
            self._use_tree(BalancedTree.from_vectors(vectors, self.tree.branching, self.seed))
        if self.tree_learning_rounds and step and step % every == 0 and step // every <= self.tree_learning_rounds:
            self.learn_tree()
        self.steps_done += 1
        return super().loss(batch)

    def sampled_softmax_loss(self, user_inputs, positives):
        """TDM's loss in place of Eq. 12: per level, the positive's ancestor against `layer_negatives` other nodes
        of that level (uniform, from the negative sampler's generator), softmax or BCE; summed over levels."""
        user = self.encode_users(user_inputs)                                                 # [B, d]
        paths, vectors, widths = self._paths[positives], [], []                              # [B, D]
        for level, count in enumerate(self.layer_negatives, start=1):
            size = int(self.tree.level_sizes[level])
            if count == 0 or size < 2:
                continue
            positive = paths[:, level - 1:level]                                             # [B, 1]
            if count >= size - 1:                                    # a small level: every other node
                negative = torch.arange(size - 1).expand(len(positives), -1)
            else:
                negative = torch.randint(0, size - 1, (len(positives), count), generator=self.sampler.generator)
            negative = negative.to(self.device)
            negative = negative + (negative >= positive).long()                            # [B, n_l], never the positive
            vectors.append(self.node_vectors(level, torch.cat([positive, negative], 1)))  # [B, 1 + n_l, d]
            widths.append(1 + negative.shape[1])
        logits = self.score_pairs(user, torch.cat(vectors, 1)) / self.temperature           # [B, sum(1 + n_l)]
        loss = 0.0
        for level_logits in torch.split(logits, widths, dim=1):                             # [B, 1 + n_l]
            if self.tdm_loss == "softmax":
                loss = loss + F.cross_entropy(level_logits, torch.zeros_like(positives))
            else:
                labels = torch.zeros_like(level_logits)
                labels[:, 0] = 1.0
                loss = loss + F.binary_cross_entropy_with_logits(level_logits, labels, reduction="sum") / len(labels)
        return loss

    @torch.no_grad()
    def learn_tree(self):
        """Rebuild the tree by balanced k-means over the current item vectors; every internal node starts again
        from the mean of its leaves' vectors."""
        was_training = self.training
        self.eval()
        leaves = self.all_item_repr()                                                        # [n_items, d]
        self.train(was_training)
        vectors = leaves.cpu().numpy()
        self._use_tree(BalancedTree.from_vectors(vectors, self.tree.branching, self.seed + int(self.steps_done)))
        means = self.tree.internal_means(vectors)                                            # [n_internal, d]
        self.node_embedding.weight[:len(means)] = torch.from_numpy(means).to(self.node_embedding.weight)
        logging.info(f"TDM: tree rebuilt from the item vectors at step {int(self.steps_done)}")

    # ---- the tree file ----------------------------------------------------------------------
    def save_weights(self, checkpoint):
        super().save_weights(checkpoint)
        self.tree.save(tree_file(checkpoint), checkpoint_hash=file_sha256(checkpoint),
                       metadata={"model_id": self.model_id})

    def load_weights(self, checkpoint):
        """The checkpoint's weights and tree; a tree file next to it must hold the same tree."""
        super().load_weights(checkpoint)
        if os.path.exists(tree_file(checkpoint)):
            saved, _ = BalancedTree.load(tree_file(checkpoint), expected_checkpoint_hash=file_sha256(checkpoint))
            if not np.array_equal(saved.leaf_items, self.tree.leaf_items):
                raise ValueError(f"{tree_file(checkpoint)}: holds another tree than checkpoint {checkpoint}")


def two_tower_item_vectors(model, expid):
    """Item vectors [n_items, d] (numpy) of the trained two-tower `expid` on `model`'s dataset, rebuilt from its
    result JSON (run_expid's `<model_root>/<dataset_id>/<expid>.json`: class and parameters) and checkpoint."""
    from . import MODELS                                  # the registry of this package, complete once imported
    path = os.path.join(model.model_dir, f"{expid}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tree_init_expid={expid!r}: {path} not found; train it first "
                                f"(python run_expid.py --expid {expid})")
    with open(path) as fd:
        result = json.load(fd)
    cls = MODELS.get(result.get("model"))
    if cls is None or not issubclass(cls, VectorServable):
        raise ValueError(f"tree_init_expid={expid!r}: {path} is a {result.get('model')} run; expected a two-tower "
                         f"model with item vectors (DSSM, GRU4Rec, SASRec)")
    # only its item vectors are read: a uniform sampler stands in for one that needs the training counts
    other = cls(model.feature_map, **{**result["params"], "gpu": -1, "negative_sampler": "uniform"})
    other.set_item_corpus(model.item_corpus)
    other.load_weights(result["checkpoint"])
    other.eval()
    return other.all_item_repr().cpu().numpy()


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TDM: {name}={value!r}; expected an int >= {minimum}")


def _layer_counts(layer_negatives, depth):
    """layer_negatives as a list of `depth` counts (an int repeated, or a list of that length)."""
    counts = [layer_negatives] * depth if isinstance(layer_negatives, int) else layer_negatives
    if (not isinstance(counts, (list, tuple)) or len(counts) != depth
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or not any(counts)):
        raise ValueError(f"TDM: layer_negatives={layer_negatives!r}; expected an int >= 0 or a list of {depth} "
                         f"ints >= 0 (one per level of the tree), not all 0")
    return list(counts)
