"""Product quantizer with EMA codebooks (SparCode, SIGIR'23, Sec. 3.2.2 and 3.2.4).

A token vector T of size D_T is split into M sub-vectors of size D_T / M. Sub-vector m is replaced by
its nearest codeword (squared Euclidean distance) in codebook C^(m) of N codewords (Eq. 7) and the
replacements are concatenated (Eq. 8). The code of a token is the tuple (k_1, ..., k_M); as one integer
key it is ``sum_m k_m * N ** (M - 1 - m)`` (k_1 is the most significant digit).

Codebooks are not trained by the optimizer. They and their EMA statistics are buffers, updated in
training mode only, under ``torch.no_grad`` and in float32, as in VQ-VAE-2 (the paper's reference
[24]) with the EMA of Sec. 3.2.4::

    N_k <- gamma * N_k + (1 - gamma) * n_k                 (n_k: sub-vectors assigned to k in the batch)
    V_k <- gamma * V_k + (1 - gamma) * sum_j x_j           (x_j: those sub-vectors)
    N~_k = (N_k + eps) / (sum_j N_j + N * eps) * sum_j N_j  (Laplace smoothing, avoids dividing by 0)
    C_k  = V_k / N~_k

Initial state: N_k = 1 and V_k = C_k (one pseudo-token sitting on each codeword), so C = V / N holds
from the start and a codeword that receives nothing keeps its position while its N_k decays.

Dead codewords: after the EMA step, a codeword whose EMA cluster size N_k is below
``dead_code_threshold`` is restarted at a random sub-vector of the current batch (N_k = 1, V_k = that
sub-vector). N_k is the smoothed number of sub-vectors the codeword receives per batch, so the default
1e-2 means "fewer than one assignment per hundred batches"; starting from N_k = 1 and gamma = 0.99 an
unused codeword is restarted after about 460 training steps. The threshold must lie in [0, 1) (0
disables restarts) so that a restarted codeword (N_k = 1) is not immediately dead again.

Frozen codebooks: with ``freeze_codebooks = True`` a training forward counts codeword usage but runs
no EMA step and no restart (``freeze_codebook`` of vector-quantize-pytorch); the codebooks stay as they
are, so a fixed token keeps its code.

Gradients (``gradient_mode``):
- ``"straight_through"`` (default): the returned vector is ``q + (tokens - tokens.detach())``; its value is
  exactly the codeword q (bit-identical to ``decode(codes)``, so training scores and index scores agree),
  its gradient is copied to the tokens, so the matching loss reaches the tokenizer.
- ``"commitment_only"``: the returned vector is ``q.detach()`` (the paper's literal sg[] reading); the
  tokenizer is trained only by the commitment loss.
- ``"rotation"``: the rotation trick of Fifty et al. (ICLR'25, "Restructuring vector quantization with
  the rotation trick"). Per sub-vector e with codeword q, the returned value is again exactly q, but the
  gradient reaching e is the codeword's gradient passed back through sg[lambda R], where R is the
  rotation taking e / ||e|| to q / ||q|| (in the plane of the two) and lambda = ||q|| / ||e||. Unlike the
  straight-through copy, the gradient then depends on where e sits relative to its codeword, so tokens
  of one cluster receive different updates.
In every mode the codebooks receive no gradient (they are buffers, never in ``parameters()``).

Commitment loss (Eq. 13): ``sum over tokens and codebooks of ||T^(m) - sg[T~^(m)]||^2`` for one user,
i.e. the squared error summed over every axis except the first (batch) axis, then averaged over the
batch. The returned ``commit_loss`` IS ALREADY MULTIPLIED by ``commitment_weight`` (lambda of Eq. 14):
the model adds it to the matching loss as it is, without multiplying by lambda again. The unweighted
value of the last forward is kept (detached) in ``last_raw_commitment`` for logging.
"""
import math

import torch
from torch import nn

GRADIENT_MODES = ("straight_through", "commitment_only", "rotation")


class ProductQuantizer(nn.Module):
    """M codebooks of N codewords of size D_T / M, nearest-codeword quantization, EMA updates.

    Args:
        token_dim: D_T, size of a token vector; must be divisible by ``num_codebooks``.
        num_codebooks: M, number of codebooks (sub-vectors per token).
        codebook_size: N, codewords per codebook. N ** M must fit in int64 (keys are int64).
        decay: gamma of the EMA, in (0, 1). Default 0.99.
        eps: Laplace smoothing of the EMA cluster sizes, > 0. Default 1e-5.
        commitment_weight: lambda of Eq. 14; the returned commitment loss is multiplied by it.
            Default 0.25.
        gradient_mode: "straight_through" (default) or "commitment_only" (see module docstring).
        dead_code_threshold: restart a codeword whose EMA cluster size falls below this, in [0, 1);
            0 disables restarts. Default 1e-2.
        kmeans_init: if True, the codebooks are set by a few k-means iterations on the sub-vectors of
            the first training batch (recommended: a random initial codebook far from the tokens
            leaves most codewords unused until they are restarted). Default False: codewords start
            as N(0, 1 / (D_T / M)) samples, i.e. of norm about 1.
        kmeans_iters: k-means iterations for ``kmeans_init``. Default 10.
    """

    def __init__(self,
                 token_dim=64,
                 num_codebooks=2,
                 codebook_size=256,
                 decay=0.99,
                 eps=1e-5,
                 commitment_weight=0.25,
                 gradient_mode="straight_through",
                 dead_code_threshold=1e-2,
                 kmeans_init=False,
                 kmeans_iters=10):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("num_codebooks", num_codebooks),
                            ("codebook_size", codebook_size), ("kmeans_iters", kmeans_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProductQuantizer: {name} must be a positive int, got {value!r}")
        if token_dim % num_codebooks != 0:
            raise ValueError(f"ProductQuantizer: token_dim={token_dim} must be divisible by "
                             f"num_codebooks={num_codebooks}")
        if codebook_size < 2:
            raise ValueError(f"ProductQuantizer: codebook_size must be >= 2, got {codebook_size}")
        if codebook_size ** num_codebooks > 2 ** 63 - 1:
            raise ValueError(f"ProductQuantizer: codebook_size ** num_codebooks = "
                             f"{codebook_size}**{num_codebooks} does not fit in an int64 key")
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ProductQuantizer: decay must be in (0, 1), got {decay!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"ProductQuantizer: eps must be > 0, got {eps!r}")
        if not float(commitment_weight) >= 0.0:
            raise ValueError(f"ProductQuantizer: commitment_weight must be >= 0, got {commitment_weight!r}")
        if gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"ProductQuantizer: gradient_mode={gradient_mode!r}, expected one of "
                             f"{GRADIENT_MODES}")
        if not 0.0 <= float(dead_code_threshold) < 1.0:
            raise ValueError(f"ProductQuantizer: dead_code_threshold must be in [0, 1), got "
                             f"{dead_code_threshold!r}")
        self.token_dim = token_dim
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.sub_dim = token_dim // num_codebooks
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.gradient_mode = gradient_mode
        self.dead_code_threshold = float(dead_code_threshold)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters

        codebooks = torch.randn(num_codebooks, codebook_size, self.sub_dim) / math.sqrt(self.sub_dim)
        self.register_buffer("codebooks", codebooks)                                   # [M, N, d]
        self.register_buffer("ema_cluster_size", torch.ones(num_codebooks, codebook_size))  # [M, N]
        self.register_buffer("ema_embed_sum", codebooks.clone())                       # [M, N, d]
        self.register_buffer("initialized", torch.tensor(not self.kmeans_init))
        # Statistics since the last codebook_usage(reset=True) call; not saved in checkpoints.
        self.register_buffer("usage_counts", torch.zeros(num_codebooks, codebook_size), persistent=False)
        self.register_buffer("restart_counts", torch.zeros(num_codebooks, dtype=torch.long),
                             persistent=False)
        # key = sum_m k_m * place_values[m]
        place_values = torch.tensor([codebook_size ** (num_codebooks - 1 - m) for m in range(num_codebooks)],
                                    dtype=torch.long)
        self.register_buffer("place_values", place_values, persistent=False)             # [M]
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
        self._check_codes(codes)
        flat = codes.reshape(-1, self.num_codebooks).long()
        vectors = self._lookup(flat)                                                   # [P, M, d]
        return vectors.reshape(*codes.shape[:-1], self.token_dim)

    def forward(self, tokens):
        """Quantize tokens; in training mode also update the codebooks.

        Args:
            tokens: [B, K_u, D_T] token vectors (any [..., D_T] works; axis 0 is the batch axis of
                the commitment-loss mean).

        Returns:
            quantized: [B, K_u, D_T] in the dtype of ``tokens``; carries gradient to ``tokens`` only in
                "straight_through" mode.
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
            quantized_out = quantized + (tokens - tokens.detach())
        elif self.gradient_mode == "rotation":
            codewords = quantized.float().reshape(sub_vectors.shape)                         # [P, M, d]
            rotated = self._rotate(sub_vectors, codewords).reshape(tokens.shape)             # [B, K_u, D_T]
            quantized_out = quantized + (rotated - rotated.detach()).to(tokens.dtype)       # value exactly q
        else:
            quantized_out = quantized
        if self.training:
            if self.freeze_codebooks:
                self.usage_counts += self._assignment_counts(codes)
            else:
                self._ema_update(sub_vectors.detach(), codes)
        codes = codes.reshape(*tokens.shape[:-1], self.num_codebooks)
        return quantized_out, codes, commit_loss

    @staticmethod
    def _rotate(sub_vectors, codewords, eps=1e-8):
        """sg[lambda R] e for every sub-vector: [P, M, d] (with gradient) and codewords [P, M, d] -> [P, M, d].

        R e = e - 2 (r . e) r + 2 (e_hat . e) q_hat with r = normalize(e_hat + q_hat); R maps e_hat to
        q_hat. Everything but the e being multiplied is detached.
        """
        with torch.no_grad():
            norm_e = sub_vectors.norm(dim=-1, keepdim=True).clamp_min(eps)            # [P, M, 1]
            norm_q = codewords.norm(dim=-1, keepdim=True).clamp_min(eps)
            e_hat, q_hat = sub_vectors / norm_e, codewords / norm_q
            r = e_hat + q_hat
            r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
            scale = norm_q / norm_e                                                    # lambda
        e = sub_vectors
        rotated = e - 2 * (e * r).sum(-1, keepdim=True) * r + 2 * (e * e_hat).sum(-1, keepdim=True) * q_hat
        return scale * rotated

    # ------------------------------------------------------------------ codebook updates
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
        counts = self._assignment_counts(codes)                                        # [M, N]
        sums = torch.zeros(num_codes * size, self.sub_dim, device=codes.device)
        sums.index_add_(0, self._flat_index(codes), sub_vectors.reshape(-1, self.sub_dim))
        sums = sums.view(num_codes, size, self.sub_dim)                                # [M, N, d]

        self.usage_counts += counts
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.ema_cluster_size.sum(dim=1, keepdim=True)                        # [M, 1]
        smoothed = (self.ema_cluster_size + self.eps) / (total + size * self.eps) * total
        self.codebooks.copy_(self.ema_embed_sum / smoothed.unsqueeze(-1))
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(sub_vectors)

    @torch.no_grad()
    def _restart_dead_codes(self, sub_vectors):
        """Move dead codewords onto random sub-vectors of the current batch. [P, M, d]."""
        num_vectors = sub_vectors.shape[0]
        for m in range(self.num_codebooks):
            dead = torch.nonzero(self.ema_cluster_size[m] < self.dead_code_threshold).squeeze(1)   # [n_dead]
            if dead.numel() == 0:
                continue
            if num_vectors >= dead.numel():
                picks = torch.randperm(num_vectors, device=sub_vectors.device)[:dead.numel()]
            else:
                picks = torch.randint(num_vectors, (dead.numel(),), device=sub_vectors.device)
            new_codewords = sub_vectors[picks, m]                                      # [n_dead, d]
            self.codebooks[m, dead] = new_codewords
            self.ema_embed_sum[m, dead] = new_codewords
            self.ema_cluster_size[m, dead] = 1.0
            self.restart_counts[m] += dead.numel()

    @torch.no_grad()
    def _kmeans_initialize(self, sub_vectors):
        """Set every codebook by k-means on the batch's sub-vectors. [P, M, d]."""
        num_vectors = sub_vectors.shape[0]
        for m in range(self.num_codebooks):
            points = sub_vectors[:, m]                                                 # [P, d]
            if num_vectors >= self.codebook_size:
                centers = points[torch.randperm(num_vectors, device=points.device)[:self.codebook_size]]
            else:
                centers = points[torch.randint(num_vectors, (self.codebook_size,), device=points.device)]
            centers = centers.clone()                                                  # [N, d]
            for _ in range(self.kmeans_iters):
                assign = (centers.pow(2).sum(-1).unsqueeze(0) - 2.0 * points @ centers.T).argmin(dim=1)
                counts = torch.bincount(assign, minlength=self.codebook_size).float()  # [N]
                sums = torch.zeros_like(centers).index_add_(0, assign, points)
                filled = counts > 0
                centers[filled] = sums[filled] / counts[filled].unsqueeze(1)           # empty: kept
            self.codebooks[m] = centers
        self.ema_embed_sum.copy_(self.codebooks)
        self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ keys and statistics
    def _check_codes(self, codes):
        if codes.shape[-1] != self.num_codebooks:
            raise ValueError(f"ProductQuantizer: last axis of codes is {codes.shape[-1]}, "
                             f"expected num_codebooks={self.num_codebooks}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"ProductQuantizer: codes must be in [0, {self.codebook_size}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")

    def pack_keys(self, codes):
        """Codes [..., M] -> int64 keys [...], key = sum_m k_m * N ** (M - 1 - m)."""
        self._check_codes(codes)
        return (codes.long() * self.place_values.to(codes.device)).sum(dim=-1)

    def unpack_keys(self, keys):
        """int64 keys [...] -> codes [..., M] (inverse of ``pack_keys``)."""
        keys = keys.long()
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.num_keys):
            raise ValueError(f"ProductQuantizer: keys must be in [0, {self.num_keys}), got range "
                             f"[{int(keys.min())}, {int(keys.max())}]")
        return torch.div(keys.unsqueeze(-1), self.place_values.to(keys.device),
                         rounding_mode="floor") % self.codebook_size

    @property
    def num_keys(self):
        """N ** M, the number of possible full codes."""
        return self.codebook_size ** self.num_codebooks

    @staticmethod
    def count_distinct_keys(keys):
        """Number of distinct values in an int64 key tensor (e.g. distinct full codes of a batch)."""
        return int(torch.unique(keys.reshape(-1)).numel())

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
                f"commitment_weight={self.commitment_weight}, gradient_mode={self.gradient_mode!r}, "
                f"dead_code_threshold={self.dead_code_threshold}, kmeans_init={self.kmeans_init}")
