"""Tests of model_zoo.layers.quantizer.ProductQuantizer."""
import itertools

import pytest
import torch
from torch import nn

from model_zoo.layers import ProductQuantizer
from model_zoo.layers.quantizer import DEAD_CODE_THRESHOLD


def _brute_force_codes(tokens, codebooks):
    """Nearest codeword per sub-vector by an explicit loop. tokens [P, D_T], codebooks [M, N, d]."""
    num_codebooks, codebook_size, sub_dim = codebooks.shape
    codes = torch.empty(tokens.shape[0], num_codebooks, dtype=torch.long)
    for p in range(tokens.shape[0]):
        for m in range(num_codebooks):
            sub_vector = tokens[p, m * sub_dim:(m + 1) * sub_dim]
            distances = [float(((sub_vector - codebooks[m, k]) ** 2).sum()) for k in range(codebook_size)]
            codes[p, m] = min(range(codebook_size), key=distances.__getitem__)
    return codes


def test_nearest_codeword_matches_brute_force():
    torch.manual_seed(0)
    quantizer = ProductQuantizer(token_dim=12, num_codebooks=3, codebook_size=16)
    tokens = torch.randn(10, 4, 12)
    quantizer.eval()
    quantized, codes, _ = quantizer(tokens)
    expected = _brute_force_codes(tokens.reshape(-1, 12), quantizer.codebooks).view(10, 4, 3)
    assert codes.dtype == torch.long and codes.shape == (10, 4, 3)
    assert torch.equal(codes, expected)
    assert torch.equal(quantizer.encode(tokens), expected)
    # The quantized vector is the concatenation of the chosen codewords (Eq. 8).
    first = torch.cat([quantizer.codebooks[m, expected[0, 0, m]] for m in range(3)])
    assert torch.allclose(quantized[0, 0], first)


def test_one_ema_step_equals_formula():
    eps = 1e-5
    quantizer = ProductQuantizer(token_dim=4, num_codebooks=2, codebook_size=3, decay=0.5, eps=eps)
    start = torch.tensor([[[0.0, 0.0], [10.0, 10.0], [-10.0, -10.0]],
                          [[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    quantizer.set_codebooks(start)                                          # no k-means on this batch
    tokens = torch.tensor([[[1.0, 1.0, 1.0, 0.2],
                            [9.0, 11.0, 0.1, 0.9],
                            [0.5, -0.5, 6.0, 4.0]]])                       # [B=1, K_u=3, D_T=4]
    quantizer.train()
    _, codes, _ = quantizer(tokens)
    assert codes[0].tolist() == [[0, 0], [1, 1], [0, 2]]
    # Hand computation with gamma = 0.5, N^(0) = 1, V^(0) = C^(0).
    expected_size = torch.tensor([[1.5, 1.0, 0.5], [1.0, 1.0, 1.0]])
    expected_sum = torch.tensor([[[0.75, 0.25], [9.5, 10.5], [-5.0, -5.0]],
                                 [[1.0, 0.1], [0.05, 0.95], [5.5, 4.5]]])
    assert torch.allclose(quantizer.ema_cluster_size, expected_size)
    assert torch.allclose(quantizer.ema_embed_sum, expected_sum)
    total = expected_size.sum(dim=1, keepdim=True)
    smoothed = (expected_size + eps) / (total + 3 * eps) * total
    assert torch.allclose(quantizer.codebooks, expected_sum / smoothed.unsqueeze(-1))
    # Without smoothing that is C = V / N (paper 3.2.4): [0.5, 1/6] for codeword 0 of codebook 0.
    assert torch.allclose(quantizer.codebooks[0, 0], torch.tensor([0.5, 1.0 / 6.0]), atol=1e-4)


def test_commitment_loss_value_and_weight():
    quantizer = ProductQuantizer(token_dim=2, num_codebooks=1, codebook_size=2, commitment_weight=0.25)
    quantizer.set_codebooks(torch.tensor([[[0.0, 0.0], [4.0, 4.0]]]))
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 4.0]],
                           [[0.0, 2.0], [0.0, 0.0]]])                      # [B=2, K_u=2, 2]
    quantizer.eval()
    _, _, commit = quantizer(tokens)
    # Per user: sum over tokens of squared error: user 0: 1 + 1 = 2, user 1: 4 + 0 = 4; mean 3.
    assert float(quantizer.last_raw_commitment) == pytest.approx(3.0)
    assert float(commit) == pytest.approx(0.75)


class _Tokenizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 2 * 8)

    def forward(self, x):
        return self.linear(x).view(-1, 2, 8)


def _matching_setup(mode):
    torch.manual_seed(1)
    tokenizer = _Tokenizer()
    quantizer = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=8, gradient_mode=mode)
    scorer = nn.Linear(8, 1)
    quantizer.train()
    tokens = tokenizer(torch.randn(6, 5))
    quantizer(tokens.detach())                                         # k-means initialisation
    codebooks_before = quantizer.codebooks.clone()
    quantized, codes, commit = quantizer(tokens)
    # The value is exactly the codewords (of the codebooks before this step's EMA update) in both modes.
    for m in range(2):
        assert torch.equal(quantized[..., 4 * m:4 * m + 4], codebooks_before[m][codes[..., m]])
    match_loss = scorer(quantized).square().mean()
    return tokenizer, tokens, quantized, commit, match_loss


def test_straight_through_passes_matching_gradient_to_tokenizer():
    tokenizer, tokens, quantized, commit, match_loss = _matching_setup("straight_through")
    grad_weight, grad_tokens = torch.autograd.grad(match_loss, [tokenizer.linear.weight, tokens],
                                                   retain_graph=True)
    assert float(grad_weight.abs().sum()) > 0
    # Straight-through: the gradient w.r.t. the tokens is the gradient w.r.t. the quantized vector.
    grad_quantized = torch.autograd.grad(match_loss, quantized, retain_graph=True)[0]
    assert torch.allclose(grad_tokens, grad_quantized)
    assert float(torch.autograd.grad(commit, tokenizer.linear.weight)[0].abs().sum()) > 0


def test_commitment_only_blocks_matching_gradient():
    tokenizer, tokens, quantized, commit, match_loss = _matching_setup("commitment_only")
    assert not quantized.requires_grad
    grad_weight = torch.autograd.grad(match_loss, tokenizer.linear.weight, retain_graph=True,
                                      allow_unused=True)[0]
    assert grad_weight is None or float(grad_weight.abs().sum()) == 0.0
    assert float(torch.autograd.grad(commit, tokenizer.linear.weight)[0].abs().sum()) > 0


def test_codebooks_are_buffers_never_optimized():
    torch.manual_seed(2)
    quantizer = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=4)
    assert list(quantizer.parameters()) == []
    assert not quantizer.codebooks.requires_grad
    assert "codebooks" in dict(quantizer.named_buffers())
    assert {"codebooks", "ema_cluster_size", "ema_embed_sum", "initialized"} <= set(quantizer.state_dict())
    tokens = torch.randn(4, 3, 8, requires_grad=True)
    quantizer.eval()
    quantized, _, commit = quantizer(tokens)
    (quantized.sum() + commit).backward()
    assert quantizer.codebooks.grad is None
    assert tokens.grad is not None


def test_decode_encode_and_key_round_trip():
    torch.manual_seed(3)
    quantizer = ProductQuantizer(token_dim=6, num_codebooks=3, codebook_size=5)
    tokens = torch.randn(7, 2, 6)
    codes = quantizer.encode(tokens)
    decoded = quantizer.decode(codes)
    quantizer.eval()
    quantized, _, _ = quantizer(tokens)
    assert torch.equal(decoded, quantized)
    for m in range(3):
        assert torch.equal(decoded[..., 2 * m:2 * m + 2], quantizer.codebooks[m][codes[..., m]])
    # Quantizing a codeword gives the codeword back.
    assert torch.equal(quantizer.encode(decoded), codes)

    all_codes = torch.tensor(list(itertools.product(range(5), repeat=3)))          # [125, 3]
    keys = quantizer.pack_keys(all_codes)
    assert keys.dtype == torch.long
    assert torch.equal(keys, torch.arange(125))                                   # k_1 most significant
    assert quantizer.pack_keys(torch.tensor([2, 0, 4])).item() == 2 * 25 + 0 * 5 + 4
    assert torch.equal(quantizer.unpack_keys(keys), all_codes)
    assert torch.equal(quantizer.unpack_keys(quantizer.pack_keys(codes)), codes)
    assert quantizer.num_keys == 125
    with pytest.raises(ValueError, match="codes must be in"):
        quantizer.pack_keys(torch.tensor([5, 0, 0]))
    with pytest.raises(ValueError, match="keys must be in"):
        quantizer.unpack_keys(torch.tensor([125]))
    with pytest.raises(ValueError, match=r"shape \(1, 2\), expected \[..., num_codebooks=3\]"):
        quantizer.pack_keys(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="num_codebooks=3"):
        quantizer.decode(torch.tensor([[1, 2]]))


def test_eval_mode_does_not_update_buffers():
    torch.manual_seed(4)
    quantizer = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=4)
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    quantizer.eval()
    for _ in range(3):
        quantizer(torch.randn(5, 2, 8) * 10)
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert quantizer.codebook_usage()["tokens_seen"] == 0 and not bool(quantizer.initialized)
    quantizer.train()
    quantizer(torch.randn(5, 2, 8))
    assert not torch.equal(quantizer.codebooks, before["codebooks"])
    assert bool(quantizer.initialized)


def test_frozen_codebooks_count_usage_but_never_move():
    torch.manual_seed(5)
    quantizer = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=4, decay=0.5)
    quantizer.train()
    quantizer(torch.randn(16, 2, 8))                        # k-means init + one EMA step
    quantizer.codebook_usage(reset=True)
    quantizer.ema_cluster_size.fill_(1.5 * DEAD_CODE_THRESHOLD)   # one more unused step would restart
    quantizer.freeze_codebooks = True
    before = {name: value.clone() for name, value in quantizer.state_dict().items()}
    tokens = torch.randn(5, 2, 8) * 10                      # far away: would move codewords
    _, codes, _ = quantizer(tokens)
    _, again, _ = quantizer(tokens)
    for name, value in quantizer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(codes, again)
    usage = quantizer.codebook_usage()
    assert usage["tokens_seen"] == 2 * 5 * 2 and usage["restarts"] == [0, 0]
    quantizer.freeze_codebooks = False
    quantizer(tokens)
    assert not torch.equal(quantizer.codebooks, before["codebooks"])
    assert sum(quantizer.codebook_usage()["restarts"]) > 0  # the same step unfrozen restarts unused codewords


def test_dead_codewords_are_restarted_and_counted():
    torch.manual_seed(5)
    quantizer = ProductQuantizer(token_dim=2, num_codebooks=1, codebook_size=4, decay=0.5)
    quantizer.set_codebooks(torch.tensor([[[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]]))
    quantizer.train()
    tokens = torch.randn(8, 2, 2) * 0.1                                            # all near codeword 0
    for _ in range(6):                               # N of unused codewords: 0.5 ** 6 >= 1e-2, kept
        quantizer(tokens)
    assert quantizer.codebook_usage(reset=False)["restarts"] == [0]
    assert float(quantizer.ema_cluster_size[0, 1]) == pytest.approx(0.5 ** 6)
    quantizer(tokens)                                # 0.5 ** 7 < 1e-2 -> the 3 unused ones restart
    usage = quantizer.codebook_usage()
    assert usage["restarts"] == [3]
    assert usage["used_codewords"] == [1] and usage["dead_codewords"] == [3]
    assert usage["tokens_seen"] == 7 * 16
    assert usage["perplexity"][0] == pytest.approx(1.0)
    sub_vectors = tokens.reshape(-1, 2)
    for k in (1, 2, 3):
        assert bool((quantizer.codebooks[0, k] == sub_vectors).all(dim=1).any())   # a current token
        assert float(quantizer.ema_cluster_size[0, k]) == 1.0
    after_reset = quantizer.codebook_usage()
    assert after_reset["restarts"] == [0] and after_reset["tokens_seen"] == 0
    assert after_reset["perplexity"][0] != after_reset["perplexity"][0]            # nan: nothing seen


def test_uniform_usage_has_perplexity_n():
    torch.manual_seed(8)
    quantizer = ProductQuantizer(token_dim=4, num_codebooks=2, codebook_size=4)
    quantizer.set_codebooks(torch.randn(2, 4, 2))
    quantizer.train()
    codes = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    quantizer(quantizer.decode(codes).view(4, 1, 4))
    usage = quantizer.codebook_usage()
    assert usage["perplexity"] == pytest.approx([4.0, 4.0])
    assert usage["dead_codewords"] == [0, 0]


def test_first_training_batch_sets_codebooks_by_kmeans():
    torch.manual_seed(6)
    centers = torch.randn(4, 8) * 5
    tokens = (centers[torch.randint(4, (64,))] + 0.05 * torch.randn(64, 8)).view(32, 2, 8)
    quantizer = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=8)
    assert not bool(quantizer.initialized)
    quantizer.eval()
    _, _, placeholder_commit = quantizer(tokens)            # the random placeholder codewords
    quantizer.train()
    quantizer(tokens)
    assert bool(quantizer.initialized)
    quantizer.eval()
    _, _, kmeans_commit = quantizer(tokens)
    assert float(kmeans_commit) < 0.05 * float(placeholder_commit)
    # Given codebooks are kept: the next training batch runs a small EMA step (gamma near 1), no k-means.
    start = torch.randn(2, 8, 4) * 5
    given = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=8, decay=0.999)
    given.set_codebooks(start)
    assert bool(given.initialized)
    given.train()
    given(tokens)
    assert torch.allclose(given.codebooks, start, atol=1.0)
    assert not torch.allclose(quantizer.codebooks, start, atol=1.0)
    with pytest.raises(ValueError, match=r"expected \[2, 8, 4\]"):
        given.set_codebooks(torch.randn(2, 8, 3))


def test_same_seed_same_result():
    def run():
        torch.manual_seed(7)
        quantizer = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=16, decay=0.5)
        quantizer.train()
        outputs = [quantizer(torch.randn(6, 3, 8)) for _ in range(12)]
        return outputs, quantizer.state_dict(), quantizer.codebook_usage()

    (outputs_a, state_a, usage_a), (outputs_b, state_b, usage_b) = run(), run()
    assert sum(usage_a["restarts"]) > 0                                            # RNG was used
    assert usage_a == usage_b
    for (q_a, c_a, l_a), (q_b, c_b, l_b) in zip(outputs_a, outputs_b):
        assert torch.equal(q_a, q_b) and torch.equal(c_a, c_b) and torch.equal(l_a, l_b)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_dim=10, num_codebooks=3), "token_dim=10 must be divisible by num_codebooks=3"),
    (dict(gradient_mode="sg"), "gradient_mode='sg'"),
    (dict(gradient_mode="rotation"), "gradient_mode='rotation'"),
    (dict(decay=1.0), "decay must be in"),
    (dict(codebook_size=1), "codebook_size must be >= 2"),
    (dict(codebook_size=2 ** 20, num_codebooks=4, token_dim=8), "does not fit an int64"),
])
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProductQuantizer(**kwargs)


def test_wrong_token_size_raises():
    quantizer = ProductQuantizer(token_dim=8, num_codebooks=2, codebook_size=4)
    with pytest.raises(ValueError, match="expected token_dim=8"):
        quantizer(torch.randn(2, 2, 6))
