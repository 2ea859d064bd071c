"""Pure method functions against slow, obviously-correct references."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vlmprune.config import resolve_budget
from vlmprune.methods._grid import grid_partition
from vlmprune.methods.base import ImageTokens
from vlmprune.methods.pool import PoolConfig, pool_tokens
from vlmprune.methods.random import RandomConfig, random_indices
from vlmprune.methods.uniform import UniformConfig, uniform_indices

GRIDS = [(1, 24, 24), (1, 4, 6), (1, 7, 5), (2, 4, 4), (3, 5, 7), (1, 1, 9)]


def _ks(n):
    return sorted({1, 2, 3, n // 4 or 1, n // 3 or 1, n // 2 or 1, n - 1 or 1, n})


@pytest.mark.parametrize("grid", GRIDS)
def test_partition_covers_grid_with_k_boxes(grid):
    n = grid[0] * grid[1] * grid[2]
    for k in _ks(n):
        labels, reps = grid_partition(grid, k)
        assert labels.shape == (n,) and reps.shape == (k,)
        assert torch.equal(torch.unique(labels), torch.arange(k))  # every region non-empty, ids 0..k-1
        assert (reps[1:] > reps[:-1]).all()
        assert torch.equal(labels[reps], torch.arange(k))  # each representative lies in its own region
        lab = labels.view(grid)
        for r in range(k):  # every region is a box: its bounding box holds only its own tokens
            where = (lab == r).nonzero()
            lo, hi = where.min(0).values, where.max(0).values + 1
            box = lab[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            assert (box == r).all()
        sizes = torch.bincount(labels)
        assert sizes.max() <= 4 * sizes.min() + 4  # near-equal regions


def test_uniform_is_a_plain_stride_when_k_tiles_the_grid():
    # slow reference: every s-th row and column, starting at the centre offset (s - 1) // 2
    for side, s in [(24, 2), (24, 3), (24, 4), (12, 3)]:
        k = (side // s) ** 2
        ref = [r * side + c for r, c in itertools.product(range((s - 1) // 2, side, s), repeat=2)]
        assert uniform_indices((1, side, side), k).tolist() == ref


def test_pool_equals_avg_pool_when_k_tiles_the_grid():
    torch.manual_seed(0)
    for side, s in [(24, 2), (24, 3), (6, 2)]:
        x = torch.randn(2, side * side, 8)
        k = (side // s) ** 2
        tokens, reps = pool_tokens(x, (1, side, side), k)
        img = x.transpose(1, 2).reshape(2, 8, side, side)
        ref = F.avg_pool2d(img, s).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(reps, uniform_indices((1, side, side), k))


def test_pool_uneven_matches_region_means():
    torch.manual_seed(1)
    grid, k = (2, 5, 7), 11
    x = torch.randn(70, 4)
    tokens, _ = pool_tokens(x, grid, k)
    labels, _ = grid_partition(grid, k)
    for r in range(k):
        torch.testing.assert_close(tokens[r], x[labels == r].mean(0))


def test_pool_keeps_dtype_and_k_equal_n_is_identity():
    x = torch.randn(16, 4, dtype=torch.bfloat16)
    tokens, reps = pool_tokens(x, (1, 4, 4), 16)
    assert tokens.dtype == torch.bfloat16 and torch.equal(tokens, x) and torch.equal(reps, torch.arange(16))


def test_random_indices_sorted_distinct_deterministic():
    a = random_indices(100, 30, seed=5)
    assert torch.equal(a, random_indices(100, 30, seed=5))
    assert not torch.equal(a, random_indices(100, 30, seed=6))
    assert len(set(a.tolist())) == 30 and (a[1:] > a[:-1]).all() and a.max() < 100


def test_random_method_keys_by_content_not_row():
    m = RandomConfig(keep=0.25, seed=3).build()
    feats = torch.zeros(64, 4)
    a = m.select(ImageTokens(feats, (1, 8, 8), 16, key=11)).indices
    b = m.select(ImageTokens(feats, (1, 8, 8), 16, key=11)).indices
    c = m.select(ImageTokens(feats, (1, 8, 8), 16, key=12)).indices
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("cfg", [UniformConfig(keep=9), PoolConfig(keep=9), RandomConfig(keep=9)])
def test_methods_return_budget(cfg):
    sel = cfg.build().select(ImageTokens(torch.randn(36, 4), (1, 6, 6), 9))
    assert sel.indices.shape == (9,) and (sel.indices[1:] > sel.indices[:-1]).all()
    if sel.tokens is not None:
        assert sel.tokens.shape == (9, 4)


def test_budget_rounding():
    assert resolve_budget(0.25, 576) == 144
    assert resolve_budget(0.111, 576) == 64
    assert resolve_budget(0.11, 576) == 64  # rounded up: the papers' 64 of 576
    assert resolve_budget(1.0, 576) == 576
    assert resolve_budget(1e-6, 576) == 1
    assert resolve_budget(64, 576) == 64 and resolve_budget(1000, 576) == 576
