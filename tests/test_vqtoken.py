"""Training-free VQToken: clustering properties, the code map, repeated video frames collapsing, positions."""

from __future__ import annotations

import pytest
import torch
from conftest import LLMProbe, get_model, inputs_for

import vlmprune
from vlmprune.methods.base import ImageTokens
from vlmprune.methods.vqtoken import VQTokenConfig, choose_k, kmeans, spherical_kmeans


def test_kmeans_partition_and_determinism():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    for k in (1, 7, 50, 200):
        labels, centres, dist = spherical_kmeans(x, k, iters=10, seed=3)
        assert labels.shape == (200,) and torch.equal(torch.unique(labels), torch.arange(k))  # a partition, none empty
        assert torch.allclose(centres.norm(dim=-1), torch.ones(k), atol=1e-5) and dist >= 0
        again = spherical_kmeans(x, k, iters=10, seed=3)[0]
        assert torch.equal(labels, again)
    assert spherical_kmeans(x, 200, iters=5, seed=3)[2] < 1e-4  # one token per code: no distortion


def test_euclidean_kmeans_separates_norms_that_cosine_merges():
    """Two nearby directions (~30 degrees apart), each at norms 1 and 10: cosine k-means (k=2) groups by direction,
    euclidean by norm; euclidean centres are the members' means and its distortion is the sum of squared distances
    to them."""
    gen = torch.Generator().manual_seed(7)
    a = torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0)
    b = torch.nn.functional.normalize(
        a + 0.5 * torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0), dim=0
    )
    dirs = torch.stack([a, b])
    x = torch.cat([dirs[0] * 1, dirs[1] * 1, dirs[0] * 10, dirs[1] * 10]).view(4, 16).repeat_interleave(10, 0)
    x = x + 0.01 * torch.randn(40, 16, generator=gen)
    cos_labels = spherical_kmeans(x, 2, iters=10, seed=0)[0]
    by_dir = torch.tensor([0, 1, 0, 1]).repeat_interleave(10)
    assert torch.equal(cos_labels == cos_labels[0], by_dir == 0)
    labels, centres, dist = kmeans(x, 2, iters=10, seed=0, distance="euclidean")
    by_norm = torch.tensor([0, 0, 1, 1]).repeat_interleave(10)
    assert torch.equal(labels == labels[0], by_norm == 0)
    for j in range(2):
        torch.testing.assert_close(centres[j], x[labels == j].mean(0))
    assert dist == pytest.approx(float(((x - centres[labels]) ** 2).sum()), rel=1e-5)
    assert torch.equal(labels, kmeans(x, 2, iters=10, seed=0, distance="euclidean")[0])  # deterministic
    assert kmeans(x, 40, iters=3, seed=1, distance="euclidean")[2] < 1e-8  # one token per code


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
def test_one_code_per_token_gives_the_tokens_back(code):
    """K = N through ``select`` itself (the patch never calls a method that keeps everything, so the conformance
    keep=1.0 test does not run the clustering): every token is its own code, in place, unchanged."""
    x = torch.randn(48, 8, generator=torch.Generator().manual_seed(6))
    sel = VQTokenConfig(keep=48, code=code).build().select(ImageTokens(x, (1, 6, 8), 48, key=2))
    assert torch.equal(sel.indices, torch.arange(48))
    assert torch.equal(torch.tensor(sel.info["code_map"]), torch.arange(48))
    torch.testing.assert_close(sel.tokens, x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("code", ["mean", "medoid"])
def test_code_tokens(code, distance):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4)) * 3
    cfg = VQTokenConfig(keep=10, code=code, distance=distance)
    sel = cfg.build().select(ImageTokens(x, (1, 8, 8), 10, key=1))
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
    "bad",
    [dict(code="centroid"), dict(iters=-1), dict(k_min=0), dict(adaptive=1), dict(tol=1.5), dict(distance="l1")],
)
def test_config_validation(bad):
    with pytest.raises(vlmprune.ConfigError):
        VQTokenConfig(**bad)
