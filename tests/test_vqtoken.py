"""Training-free VQToken: clustering properties, the code map, repeated video frames collapsing, positions."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for

import vlmprune
from vlmprune.methods.base import ImageTokens
from vlmprune.methods.vqtoken import VQTokenConfig, choose_k, spherical_kmeans


def test_kmeans_partition_and_determinism():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    for k in (1, 7, 50, 200):
        labels, centres, dist = spherical_kmeans(x, k, iters=10, seed=3)
        assert labels.shape == (200,) and torch.equal(torch.unique(labels), torch.arange(k))  # a partition, none empty
        assert torch.allclose(centres.norm(dim=-1), torch.ones(k), atol=1e-5) and dist >= 0
        again = spherical_kmeans(x, k, iters=10, seed=3)[0]
        assert torch.equal(labels, again)
    assert spherical_kmeans(x, 200, iters=5, seed=3)[2] < 1e-4  # one token per code: no distortion


def test_distortion_falls_with_k_and_elbow_returns_a_grid_k():
    # 6 well-separated directions with small noise: the elbow is at 6
    gen = torch.Generator().manual_seed(1)
    dirs = torch.randn(6, 32, generator=gen)
    x = dirs.repeat_interleave(30, 0) + 0.01 * torch.randn(180, 32, generator=gen)
    d = [spherical_kmeans(x, k, 15, 0)[2] for k in (2, 4, 6, 8)]
    assert d[0] > d[1] > d[2] and d[2] < 0.05 * d[0]
    assert choose_k(x, 2, 12, 2, 0.02, 15, 0) == 6


def test_repeated_frames_collapse_to_one_code_per_position():
    """A synthetic clip whose 4 frames repeat one frame: with one code per frame token, every code gathers the
    same token of each frame, and the code map is identical across frames."""
    frame = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    clip = frame.repeat(4, 1)  # (t=4) x 16 tokens, raster order
    method = VQTokenConfig(keep=16).build()
    sel = method.select(ImageTokens(clip, (4, 4, 4), 16, key=5, kind="video"))
    code_map = torch.tensor(sel.info["code_map"]).view(4, 16)
    assert all(torch.equal(code_map[0], code_map[t]) for t in range(4))
    assert torch.equal(torch.unique(code_map[0]), torch.arange(16))
    torch.testing.assert_close(sel.tokens, clip[sel.indices])  # mean of identical members = the token


@pytest.mark.parametrize("code", ["mean", "medoid"])
def test_code_tokens(code):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4)) * 3
    sel = VQTokenConfig(keep=10, code=code).build().select(ImageTokens(x, (1, 8, 8), 10, key=1))
    labels = torch.tensor(sel.info["code_map"])
    assert (sel.indices[1:] > sel.indices[:-1]).all() and torch.equal(labels[sel.indices], torch.arange(10))
    for j in range(10):
        members = x[labels == j]
        want = members.mean(0) if code == "mean" else x[sel.indices[j]]
        torch.testing.assert_close(sel.tokens[j], want, atol=1e-5, rtol=1e-5)


def test_adaptive_size_may_be_smaller_than_the_budget():
    model = get_model("qwen2_vl")
    inputs = inputs_for(model, [[3, ("image", 8, 12), 2]])
    with vlmprune.patched(model, method="vqtoken", keep=20, adaptive=True, k_min=2, k_step=2, tol=0.5):
        with LLMProbe(model) as probe, torch.no_grad():
            model(**inputs)
        info = vlmprune.last_stats(model)["images"][0]
    assert 2 <= info["codebook_size"] <= 20 and info["tokens_out"] == info["codebook_size"]
    assert int(probe.calls[0]["attention_mask"].sum()) == inputs["input_ids"].shape[1] - 24 + info["tokens_out"]


@pytest.mark.parametrize(
    "bad", [dict(code="centroid"), dict(iters=-1), dict(k_min=0), dict(adaptive=1), dict(tol=1.5)]
)
def test_config_validation(bad):
    with pytest.raises(vlmprune.ConfigError):
        VQTokenConfig(**bad)
