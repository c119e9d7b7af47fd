"""Product quantizer with EMA codebooks (SparCode, SIGIR'23, Sec. 3.2.2 and 3.2.4).

A token vector T of size D_T is split into M sub-vectors of size D_T / M. Sub-vector m is replaced by
its nearest codeword (squared Euclidean distance) in codebook C^(m) of N codewords (Eq. 7) and the
replacements are concatenated (Eq. 8). The code of a token is the tuple (k_1, ..., k_M); its int64 key
is packed by ``retrieval/code_keys.py`` (k_1 is the most significant digit in base N).

Codebooks are not trained by the optimizer. They and their EMA statistics are buffers, updated in
training mode only, under ``torch.no_grad`` and in float32, as in VQ-VAE-2 (the paper's reference
[24]) with the EMA of Sec. 3.2.4::

    N_k <- gamma * N_k + (1 - gamma) * n_k                 (n_k: sub-vectors assigned to k in the batch)
    V_k <- gamma * V_k + (1 - gamma) * sum_j x_j           (x_j: those sub-vectors)
    N~_k = (N_k + eps) / (sum_j N_j + N * eps) * sum_j N_j  (Laplace smoothing, avoids dividing by 0)
    C_k  = V_k / N~_k

Initial state: the first training batch sets every codebook by k-means (``KMEANS_ITERS`` iterations) on
its sub-vectors, with N_k = 1 and V_k = C_k (one pseudo-token on each codeword), so C = V / N holds from
the start and a codeword that receives nothing keeps its position while its N_k decays. Random initial
codewords far from the tokens would leave most of them unused. ``set_codebooks`` starts from given
codebooks instead.

Dead codewords: after the EMA step, a codeword whose EMA cluster size N_k is below
``DEAD_CODE_THRESHOLD`` (1e-2) is restarted at a random sub-vector of the current batch (N_k = 1,
V_k = that sub-vector). N_k is the smoothed number of sub-vectors the codeword receives per batch, so
1e-2 means "fewer than one assignment per hundred batches"; from N_k = 1 and gamma = 0.99 an unused
codeword is restarted after about 460 training steps.

Frozen codebooks: with ``freeze_codebooks = True`` a training forward counts codeword usage but runs
no EMA step and no restart (``freeze_codebook`` of vector-quantize-pytorch); the codebooks stay as they
are, so a fixed token keeps its code.

Gradients (``gradient_mode``; benchmarks/results/sparcode_vs_dssm.md compares the two):
- ``"straight_through"`` (default): the returned vector is ``q + (tokens - tokens.detach())``; its value is
  exactly the codeword q (bit-identical to ``decode(codes)``, so training scores and index scores agree),
  its gradient is copied to the tokens, so the matching loss reaches the tokenizer.
- ``"commitment_only"``: the returned vector is ``q.detach()`` (the paper's literal sg[] reading); the
  tokenizer is trained only by the commitment loss.
In both modes the codebooks receive no gradient (they are buffers, never in ``parameters()``).

Commitment loss (Eq. 13): ``sum over tokens and codebooks of ||T^(m) - sg[T~^(m)]||^2`` for one user,
i.e. the squared error summed over every axis except the first (batch) axis, then averaged over the
batch. The returned ``commit_loss`` IS ALREADY MULTIPLIED by ``commitment_weight`` (lambda of Eq. 14):
the model adds it to the matching loss as it is, without multiplying by lambda again. The unweighted
value of the last forward is kept (detached) in ``last_raw_commitment`` for logging.
"""
import math

import torch
from torch import nn

from ..retrieval.code_keys import key_space, pack_codes, unpack_keys

GRADIENT_MODES = ("straight_through", "commitment_only")
DEAD_CODE_THRESHOLD = 1e-2   # restart a codeword whose EMA cluster size falls below this
KMEANS_ITERS = 10            # k-means iterations of the initialisation on the first training batch


class BatchStatistics:
    """How the codebook updates see the training batch; in one process, the batch itself.

    Under torch.distributed, engine/distributed.py installs a subclass with ``set_batch_statistics`` (a layer
    never imports the engine): ``all_sum`` sums a tensor over the processes, ``all_rows`` concatenates the
    rows of every process in rank order and ``from_leader`` returns rank 0's tensor on every rank, so that
    the EMA step, the k-means initialisation and the dead-code restarts are those of the union of the
    processes' batches and every process holds the same codebooks.
    """
    is_leader = True

    def all_sum(self, tensor):
        return tensor

    def all_rows(self, tensor):
        return tensor

    def from_leader(self, tensor):
        return tensor


_batch_statistics = BatchStatistics()


def set_batch_statistics(statistics=None):
    """Install a BatchStatistics for every ProductQuantizer of this process (None: back to one process)."""
    global _batch_statistics
    _batch_statistics = statistics if statistics is not None else BatchStatistics()


class ProductQuantizer(nn.Module):
    """M codebooks of N codewords of size D_T / M, nearest-codeword quantization, EMA updates.

    Args:
        token_dim: D_T, size of a token vector; must be divisible by ``num_codebooks``.
        num_codebooks: M, number of codebooks (sub-vectors per token).
        codebook_size: N, codewords per codebook, >= 2. N ** M must fit in int64 (keys are int64).
        decay: gamma of the EMA, in (0, 1). Default 0.99.
        eps: Laplace smoothing of the EMA cluster sizes, > 0. Default 1e-5.
        commitment_weight: lambda of Eq. 14, >= 0; the returned commitment loss is multiplied by it.
            Default 0.25.
        gradient_mode: "straight_through" (default) or "commitment_only" (see module docstring).
    """

    def __init__(self,
                 token_dim=64,
                 num_codebooks=2,
                 codebook_size=256,
                 decay=0.99,
                 eps=1e-5,
                 commitment_weight=0.25,
                 gradient_mode="straight_through"):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("num_codebooks", num_codebooks),
                            ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProductQuantizer: {name} must be a positive int, got {value!r}")
        if token_dim % num_codebooks != 0:
            raise ValueError(f"ProductQuantizer: token_dim={token_dim} must be divisible by "
                             f"num_codebooks={num_codebooks}")
        if codebook_size < 2:
            raise ValueError(f"ProductQuantizer: codebook_size must be >= 2, got {codebook_size}")
        key_space(num_codebooks, codebook_size)             # ValueError when N ** M overflows an int64 key
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ProductQuantizer: decay must be in (0, 1), got {decay!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"ProductQuantizer: eps must be > 0, got {eps!r}")
        if not float(commitment_weight) >= 0.0:
            raise ValueError(f"ProductQuantizer: commitment_weight must be >= 0, got {commitment_weight!r}")
        if gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"ProductQuantizer: gradient_mode={gradient_mode!r}, expected one of "
                             f"{GRADIENT_MODES}")
        self.token_dim = token_dim
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.sub_dim = token_dim // num_codebooks
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.gradient_mode = gradient_mode

        # Placeholder codewords of norm about 1 until the first training batch sets them by k-means.
        codebooks = torch.randn(num_codebooks, codebook_size, self.sub_dim) / math.sqrt(self.sub_dim)
        self.register_buffer("codebooks", codebooks)                                   # [M, N, d]
        self.register_buffer("ema_cluster_size", torch.ones(num_codebooks, codebook_size))  # [M, N]
        self.register_buffer("ema_embed_sum", codebooks.clone())                       # [M, N, d]
        self.register_buffer("initialized", torch.tensor(False))
        # Statistics since the last codebook_usage(reset=True) call; not saved in checkpoints.
        self.register_buffer("usage_counts", torch.zeros(num_codebooks, codebook_size), persistent=False)
        self.register_buffer("restart_counts", torch.zeros(num_codebooks, dtype=torch.long),
                             persistent=False)
        self.last_raw_commitment = None
        # True: training forwards still count codeword usage but move no codeword (no EMA step, no
        # restart), so every token keeps its code. Set by the model (not saved in checkpoints).
        self.freeze_codebooks = False

    # ------------------------------------------------------------------ quantization
    def _split(self, tokens):
        """[..., D_T] -> float32 [P, M, d] with P = number of tokens."""
        if tokens.shape[-1] != self.token_dim:
            raise ValueError(f"ProductQuantizer: last axis of tokens is {tokens.shape[-1]}, "
                             f"expected token_dim={self.token_dim}")
        return tokens.reshape(-1, self.num_codebooks, self.sub_dim).float()

    def _nearest(self, sub_vectors):
        """Index of the nearest codeword for every sub-vector. [P, M, d] -> [P, M] long."""
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 ; ||x||^2 is constant per row and dropped.
        cross = torch.einsum("pmd,mnd->pmn", sub_vectors, self.codebooks)            # [P, M, N]
        codeword_sq_norm = self.codebooks.pow(2).sum(-1)                               # [M, N]
        return (codeword_sq_norm.unsqueeze(0) - 2.0 * cross).argmin(dim=-1)            # [P, M]

    def _lookup(self, codes):
        """[P, M] long -> [P, M, d] codewords."""
        codebook_index = torch.arange(self.num_codebooks, device=codes.device)
        return self.codebooks[codebook_index.unsqueeze(0), codes]                      # [P, M, d]

    def encode(self, tokens):
        """Codes of tokens without touching any statistics. tokens [..., D_T] -> codes [..., M] long."""
        with torch.no_grad():
            codes = self._nearest(self._split(tokens))                                 # [P, M]
        return codes.reshape(*tokens.shape[:-1], self.num_codebooks)

    def decode(self, codes):
        """Quantized vectors of codes. codes [..., M] long -> [..., D_T] float32 (no gradient)."""
        self._check_code_axis(codes)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"ProductQuantizer: codes must be in [0, {self.codebook_size}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        flat = codes.reshape(-1, self.num_codebooks).long()
        vectors = self._lookup(flat)                                                   # [P, M, d]
        return vectors.reshape(*codes.shape[:-1], self.token_dim)

    def forward(self, tokens):
        """Quantize tokens; in training mode also update the codebooks.

        Args:
            tokens: [B, K_u, D_T] token vectors (any [..., D_T] works; axis 0 is the batch axis of
                the commitment-loss mean).

        Returns:
            quantized: [B, K_u, D_T] in the dtype of ``tokens``, value exactly the codewords; carries
                gradient to ``tokens`` only in "straight_through" mode.
            codes: [B, K_u, M] long codeword indices.
            commit_loss: scalar, ``commitment_weight`` * mean over the batch of the squared error summed
                over tokens and sub-vectors (Eq. 13).
        """
        sub_vectors = self._split(tokens)                                              # [P, M, d]
        if self.training and not self.freeze_codebooks and not bool(self.initialized):
            self._kmeans_initialize(sub_vectors.detach())
        with torch.no_grad():
            codes = self._nearest(sub_vectors)                                         # [P, M]
            quantized = self._lookup(codes).reshape(tokens.shape).to(tokens.dtype)     # [B, K_u, D_T]
        squared_error = (tokens.float() - quantized.float()).pow(2)                   # quantized is sg[.]
        raw_commitment = squared_error.reshape(tokens.shape[0], -1).sum(dim=1).mean()
        self.last_raw_commitment = raw_commitment.detach()
        commit_loss = self.commitment_weight * raw_commitment
        if self.gradient_mode == "straight_through":
            # Value exactly q (t - sg[t] is exactly 0), gradient copied to the tokens.
            quantized = quantized + (tokens - tokens.detach())
        if self.training:
            if self.freeze_codebooks:
                self.usage_counts += self._assignment_counts(codes)
            else:
                self._ema_update(sub_vectors.detach(), codes)
        codes = codes.reshape(*tokens.shape[:-1], self.num_codebooks)
        return quantized, codes, commit_loss

    # ------------------------------------------------------------------ codebook updates
    @torch.no_grad()
    def set_codebooks(self, codebooks):
        """Start from the given codebooks [M, N, d] (one pseudo-token on each codeword; no k-means init)."""
        expected = (self.num_codebooks, self.codebook_size, self.sub_dim)
        if tuple(codebooks.shape) != expected:
            raise ValueError(f"ProductQuantizer.set_codebooks: shape {tuple(codebooks.shape)}, expected "
                             f"{list(expected)}")
        self.codebooks.copy_(codebooks)
        self.ema_embed_sum.copy_(codebooks)
        self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    def _flat_index(self, codes):
        """[P, M] codes -> [P*M] positions in the flattened [M * N] codeword axis."""
        return (codes + torch.arange(self.num_codebooks, device=codes.device) * self.codebook_size).reshape(-1)

    @torch.no_grad()
    def _assignment_counts(self, codes):
        """Sub-vectors assigned to every codeword: [P, M] -> [M, N] float32."""
        counts = torch.zeros(self.num_codebooks * self.codebook_size, device=codes.device)
        flat_index = self._flat_index(codes)                                           # [P*M]
        counts.index_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.float32))
        return counts.view(self.num_codebooks, self.codebook_size)                     # [M, N]

    @torch.no_grad()
    def _ema_update(self, sub_vectors, codes):
        """One EMA step (module docstring) + dead-codeword restarts. [P, M, d], [P, M]."""
        num_codes, size = self.num_codebooks, self.codebook_size
        counts = _batch_statistics.all_sum(self._assignment_counts(codes))             # [M, N]
        sums = torch.zeros(num_codes * size, self.sub_dim, device=codes.device)
        sums.index_add_(0, self._flat_index(codes), sub_vectors.reshape(-1, self.sub_dim))
        sums = _batch_statistics.all_sum(sums.view(num_codes, size, self.sub_dim))     # [M, N, d]

        self.usage_counts += counts
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.ema_cluster_size.sum(dim=1, keepdim=True)                        # [M, 1]
        smoothed = (self.ema_cluster_size + self.eps) / (total + size * self.eps) * total
        self.codebooks.copy_(self.ema_embed_sum / smoothed.unsqueeze(-1))
        self._restart_dead_codes(sub_vectors)

    @torch.no_grad()
    def _restart_dead_codes(self, sub_vectors):
        """Move dead codewords onto random sub-vectors of the current batch. [P, M, d].

        The EMA cluster sizes are the same in every process, so all of them gather the rows together;
        rank 0 draws the new codewords and every process takes its draw."""
        if not bool((self.ema_cluster_size < DEAD_CODE_THRESHOLD).any()):
            return
        sub_vectors = _batch_statistics.all_rows(sub_vectors)                         # [P_all, M, d]
        for m in range(self.num_codebooks):
            dead = torch.nonzero(self.ema_cluster_size[m] < DEAD_CODE_THRESHOLD).squeeze(1)   # [n_dead]
            if dead.numel() == 0:
                continue
            new_codewords = sub_vectors[self._sample_rows(sub_vectors.shape[0], dead.numel(),
                                                          sub_vectors.device), m]     # [n_dead, d]
            new_codewords = _batch_statistics.from_leader(new_codewords.contiguous())
            self.codebooks[m, dead] = new_codewords
            self.ema_embed_sum[m, dead] = new_codewords
            self.ema_cluster_size[m, dead] = 1.0
            self.restart_counts[m] += dead.numel()

    @staticmethod
    def _sample_rows(num_rows, count, device):
        """`count` random row indices in [0, num_rows): distinct when there are enough rows."""
        if num_rows >= count:
            return torch.randperm(num_rows, device=device)[:count]
        return torch.randint(num_rows, (count,), device=device)

    @torch.no_grad()
    def _kmeans_initialize(self, sub_vectors):
        """Set every codebook by k-means on the batch's sub-vectors. [P, M, d].

        The rows of every process are gathered; rank 0 runs the k-means and every process takes its result."""
        sub_vectors = _batch_statistics.all_rows(sub_vectors)                         # [P_all, M, d]
        codebooks = torch.zeros_like(self.codebooks)                                   # [M, N, d]
        for m in range(self.num_codebooks if _batch_statistics.is_leader else 0):
            points = sub_vectors[:, m]                                                 # [P, d]
            centers = points[self._sample_rows(points.shape[0], self.codebook_size, points.device)].clone()
            for _ in range(KMEANS_ITERS):
                assign = (centers.pow(2).sum(-1).unsqueeze(0) - 2.0 * points @ centers.T).argmin(dim=1)
                counts = torch.bincount(assign, minlength=self.codebook_size).float()  # [N]
                sums = torch.zeros_like(centers).index_add_(0, assign, points)
                filled = counts > 0
                centers[filled] = sums[filled] / counts[filled].unsqueeze(1)           # empty: kept
            codebooks[m] = centers
        self.set_codebooks(_batch_statistics.from_leader(codebooks))

    # ------------------------------------------------------------------ keys and statistics
    def _check_code_axis(self, codes):
        if codes.dim() < 1 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(f"ProductQuantizer: codes of shape {tuple(codes.shape)}, expected [..., "
                             f"num_codebooks={self.num_codebooks}]")

    def pack_keys(self, codes):
        """Codes [..., M] -> int64 keys [...] (``code_keys.pack_codes``)."""
        self._check_code_axis(codes)
        return pack_codes(codes, self.codebook_size)

    def unpack_keys(self, keys):
        """int64 keys [...] -> codes [..., M] (inverse of ``pack_keys``)."""
        return unpack_keys(keys, self.codebook_size, self.num_codebooks)

    @property
    def num_keys(self):
        """N ** M, the number of possible full codes."""
        return key_space(self.num_codebooks, self.codebook_size)

    def codebook_usage(self, reset=True):
        """Usage of the codebooks over the training forwards since the last reset.

        Returns a dict of per-codebook lists (index m):
            perplexity: exp(entropy) of the codeword assignment frequencies (N = uniform use,
                1 = collapse); nan if no training token was seen.
            used_codewords: codewords assigned at least once.
            dead_codewords: N - used_codewords.
            restarts: dead-codeword restarts.
            tokens_seen: sub-vectors quantized per codebook (int, same for every m).
        If ``reset`` the counters start again from zero (call it once per epoch).
        """
        counts = self.usage_counts                                                     # [M, N]
        totals = counts.sum(dim=1)                                                     # [M]
        probs = counts / totals.clamp_min(1.0).unsqueeze(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1)
        perplexity = torch.where(totals > 0, entropy.exp(), torch.full_like(entropy, float("nan")))
        used = (counts > 0).sum(dim=1)
        usage = {
            "perplexity": [float(p) for p in perplexity],
            "used_codewords": [int(u) for u in used],
            "dead_codewords": [int(self.codebook_size - u) for u in used],
            "restarts": [int(r) for r in self.restart_counts],
            "tokens_seen": int(totals[0]) if totals.numel() else 0,
        }
        if reset:
            self.usage_counts.zero_()
            self.restart_counts.zero_()
        return usage

    def extra_repr(self):
        return (f"token_dim={self.token_dim}, num_codebooks={self.num_codebooks}, "
                f"codebook_size={self.codebook_size}, decay={self.decay}, "
                f"commitment_weight={self.commitment_weight}, gradient_mode={self.gradient_mode!r}")
