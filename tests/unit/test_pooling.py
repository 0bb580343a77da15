# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from kalm_t5gemma2_vllm_plugin.constants import SUPPORTED_ENCODER_CHUNK_SIZES
from kalm_t5gemma2_vllm_plugin.mep import mep_pool, pooled_length


def test_pool_factor_two_by_hand() -> None:
    hidden = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1]])
    pooled, pooled_mask = mep_pool(hidden, mask, 2)
    assert pooled.tolist() == [[[2.0, 3.0], [6.0, 7.0], [9.0, 10.0]]]
    assert pooled_mask.tolist() == [[1, 1, 1]]


def test_partial_last_chunk_averages_only_real_tokens() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [5.0], [100.0], [100.0]]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    pooled, pooled_mask = mep_pool(hidden, mask, 2)
    # chunks: (1+3)/2, 5 alone (100 is padding), all padding -> 0
    assert pooled.tolist() == [[[2.0], [5.0], [0.0]]]
    assert pooled_mask.tolist() == [[1, 1, 0]]


def test_batched_pooling_equals_per_document_pooling() -> None:
    torch.manual_seed(0)
    lengths = [7, 3, 1]
    hidden = torch.randn(3, 7, 4)
    mask = (torch.arange(7) < torch.tensor(lengths)[:, None]).long()
    for factor in SUPPORTED_ENCODER_CHUNK_SIZES:
        pooled, pooled_mask = mep_pool(hidden, mask, factor)
        for i, n in enumerate(lengths):
            alone, _ = mep_pool(hidden[i : i + 1, :n], mask[i : i + 1, :n], factor)
            rows = pooled_length(n, factor)
            assert int(pooled_mask[i].sum()) == rows
            torch.testing.assert_close(pooled[i, :rows], alone[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", SUPPORTED_ENCODER_CHUNK_SIZES, ids=lambda f: f"x{f}")
def test_each_supported_factor_is_a_masked_chunk_mean(factor: int) -> None:
    torch.manual_seed(factor)
    length = 37
    hidden = torch.randn(1, length, 3)
    pooled, pooled_mask = mep_pool(
        hidden, torch.ones(1, length, dtype=torch.long), factor
    )
    expected = torch.stack(
        [hidden[0, i : i + factor].mean(0) for i in range(0, length, factor)]
    )
    torch.testing.assert_close(pooled[0], expected)
    assert pooled_mask.tolist() == [[1] * pooled_length(length, factor)]


def test_factor_one_and_none_are_the_identity() -> None:
    hidden = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    same, same_mask = mep_pool(hidden, mask, None)
    assert same is hidden and same_mask is mask
    one, one_mask = mep_pool(hidden, mask, 1)
    torch.testing.assert_close(one * mask[..., None], hidden * mask[..., None])
    assert one_mask.tolist() == mask.tolist()


def test_bfloat16_states_stay_bfloat16() -> None:
    hidden = torch.randn(1, 8, 4, dtype=torch.bfloat16)
    pooled, _ = mep_pool(hidden, torch.ones(1, 8, dtype=torch.long), 4)
    assert pooled.dtype == torch.bfloat16


def test_pooled_length() -> None:
    assert [pooled_length(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert pooled_length(9, None) == 9


def test_a_nan_at_a_padded_position_does_not_reach_its_chunk() -> None:
    """Some CUDA attention kernels return NaN for fully masked (padded) rows;
    pooling selects real positions, it does not multiply padding by zero."""
    hidden = torch.tensor([[[1.0], [3.0], [5.0], [float("nan")], [float("inf")]]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    pooled, pooled_mask = mep_pool(hidden, mask, 2)
    assert pooled.tolist() == [[[2.0], [5.0], [0.0]]]
    assert pooled_mask.tolist() == [[1, 1, 0]]
