"""Code keys (model_zoo/retrieval/code_keys.py): one packing for the quantizer (torch) and the index (numpy)."""
import numpy as np
import pytest
import torch

from model_zoo.retrieval.code_keys import choose_key_set, key_space, pack_codes, unpack_keys


def test_numpy_and_torch_give_the_same_keys_and_round_trip():
    codes = np.random.default_rng(1).integers(0, 7, size=(5, 6, 3))                    # [.., M=3], N=7
    keys_np = pack_codes(codes, 7)
    keys_t = pack_codes(torch.from_numpy(codes), 7)
    assert keys_np.shape == (5, 6) and keys_np.dtype == np.int64
    assert torch.is_tensor(keys_t) and keys_t.dtype == torch.long
    np.testing.assert_array_equal(keys_t.numpy(), keys_np)
    assert keys_np[0, 0] == codes[0, 0, 0] * 49 + codes[0, 0, 1] * 7 + codes[0, 0, 2]   # big-endian digits
    np.testing.assert_array_equal(unpack_keys(keys_np, 7, 3), codes)
    np.testing.assert_array_equal(unpack_keys(keys_t, 7, 3).numpy(), codes)
    every_key = np.arange(343)
    np.testing.assert_array_equal(pack_codes(unpack_keys(every_key, 7, 3), 7), every_key)
    np.testing.assert_array_equal(pack_codes(unpack_keys(torch.from_numpy(every_key), 7, 3), 7).numpy(), every_key)


def test_large_key_spaces_pack_exactly_in_int64():
    codes = np.array([[255] * 7, [0] * 6 + [1]])                                        # N=256, M=7: 2^56 keys
    assert key_space(7, 256) == 2 ** 56
    np.testing.assert_array_equal(pack_codes(codes, 256), [2 ** 56 - 1, 1])
    np.testing.assert_array_equal(pack_codes(torch.from_numpy(codes), 256).numpy(), [2 ** 56 - 1, 1])


@pytest.mark.parametrize("as_torch", [False, True])
def test_invalid_codes_and_keys_are_rejected(as_torch):
    wrap = torch.from_numpy if as_torch else (lambda array: array)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 7\), found range \[0, 7\]"):
        pack_codes(wrap(np.array([[0, 7]])), 7)
    with pytest.raises(ValueError, match="does not fit an int64"):
        pack_codes(wrap(np.zeros((1, 16), np.int64)), 1 << 16)
    with pytest.raises(ValueError, match=r"keys must be in \[0, N\^M = 343\)"):
        unpack_keys(wrap(np.array([343])), 7, 3)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(wrap(np.zeros((2, 3), np.float32)), 7)
    with pytest.raises(ValueError, match="codebook_size=0; expected a positive int"):
        key_space(2, 0)


def test_choose_key_set():
    keys, kind = choose_key_set(2, 8, index_max_keys=64)
    assert kind == "all"
    np.testing.assert_array_equal(keys, np.arange(64))
    observed = pack_codes(np.array([[1, 2], [1, 2], [7, 7], [0, 3], [7, 7], [7, 7]]), 8)   # keys 10, 10, 63, 3, ..
    keys, kind = choose_key_set(2, 8, observed, index_max_keys=63)
    assert kind == "observed"
    np.testing.assert_array_equal(keys, [3, 10, 63])
    with pytest.warns(UserWarning, match="3 distinct observed keys exceed index_max_keys=2"):
        keys, _ = choose_key_set(2, 8, torch.from_numpy(observed), index_max_keys=2)
    np.testing.assert_array_equal(keys, [10, 63])                                        # the two most frequent
    # distinct keys with counts: the same choice as the repeated keys
    with pytest.warns(UserWarning):
        keys, _ = choose_key_set(2, 8, np.array([3, 10, 63]), index_max_keys=2, counts=np.array([1, 2, 3]))
    np.testing.assert_array_equal(keys, [10, 63])
    with pytest.warns(UserWarning):
        keys, _ = choose_key_set(2, 8, np.array([3, 10, 63]), index_max_keys=1, counts=np.array([5, 2, 5]))
    np.testing.assert_array_equal(keys, [3])                                             # tie: smaller key first
    with pytest.raises(ValueError, match="pass the observed_keys"):
        choose_key_set(2, 8, None, index_max_keys=10)
    with pytest.raises(ValueError, match="counts has 2 entries; expected one per observed key"):
        choose_key_set(2, 8, np.array([3, 10, 63]), index_max_keys=10, counts=np.array([1, 2]))
