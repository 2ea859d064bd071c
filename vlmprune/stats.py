"""Analytic FLOPs of a VLM prefill and decode step, per component, and a cross-check with torch's counter.

Convention (the same as ``torch.utils.flop_counter.FlopCounterMode``, so the two agree exactly on eager
attention): matrix products and convolutions only, 2 FLOPs per multiply-accumulate; attention counts the full
``Lq x Lk`` score and value products (causal masking does not halve it); norms, activations, softmax, RoPE and
biases are ignored. On CPU the counter does not see SDPA unless :func:`register_cpu_sdpa_flops` was called.
(transformers 5.0 computes RoPE angles with a small matmul the counter sees: ``head_dim * n`` FLOPs per
rotary call, about 1e-4 of a layer; later releases don't.)

Formulas (``n`` tokens through a block, ``d`` width, ``f`` MLP width, ``d_q = heads * head_dim``,
``d_kv = kv_heads * head_dim``):

* LLM decoder layer: ``2 n d (2 d_q + 2 d_kv)`` (q, k, v, o projections; o maps ``d_q -> d``)
  ``+ 3 * 2 n d f`` (gated MLP) ``+ 2 * 2 n_q n_k d_q`` (scores and values); a mixture-of-experts layer
  (Qwen3-VL-MoE) replaces the MLP by its router ``2 n d E`` and the ``k`` experts each token runs,
  ``k * 3 * 2 n d f_moe`` (torch's counter misses the experts' grouped matmuls; tests count them from the routing);
* lm_head: ``2 d V`` per position whose logits are computed (``logits_to_keep``);
* CLIP tower (LLaVA): patch conv ``2 P (3 p^2) d`` + per layer ``8 N d^2 + 4 N d f + 4 N^2 d`` with ``N = P + 1``
  (CLS), for every layer of the tower: transformers runs them all although LLaVA reads layer -2 (measured on
  5.0-5.24; ``vit_layers`` overrides it, e.g. for a tower truncated at the feature layer);
* LLaVA projector: ``2 P d_v d_t + 2 P d_t^2`` per image (runs on all patches, before pruning); LLaVA-NeXT: the
  tower and projector run once per crop (base view included, :func:`anyres_crops`);
* SigLIP tower (LLaVA-OneVision): as CLIP with ``N = P`` (no CLS), plus, when ``vision_use_head`` keeps it, the
  pooling head ``2 d^2 (2 + 2P) + 4 P d + 4 d f`` (one probe query); projector as LLaVA's; once per tower input:
  the crops of a sample's only image, one base view per image of a multi-image sample, one per video frame
  (:func:`onevision_tower_inputs`);
* Qwen ViT: patch conv ``2 S (C t_p p^2) d``; per block ``2 S d (3d) + 2 S d d`` + MLP (Qwen2-VL ``4 S d f``;
  Qwen2.5-VL gated ``6 S d f``; Qwen3-VL ``4 S d f``) + attention ``4 d sum(n_c^2)`` over its attention chunks
  (frames for full blocks, windows for Qwen2.5-VL's window blocks); merger ``2 (S/m^2) (d m^2)^2 + 2 (S/m^2) (d m^2)
  d_out``, once more per DeepStack block for Qwen3-VL.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = [
    "FLOP_MODEL_TYPES",
    "FlopBreakdown",
    "llm_layer_flops",
    "llm_flops",
    "llm_flops_in_llm_pruning",
    "vision_flops",
    "prefill_flops",
    "anyres_crops",
    "onevision_tower_inputs",
    "onevision_lone_images",
    "register_cpu_sdpa_flops",
    "count_flops",
]


#: the ``config.model_type`` values :func:`vision_flops` (and so :func:`prefill_flops`) has a formula for
FLOP_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@dataclasses.dataclass
class FlopBreakdown:
    """FLOPs of one prefill (and of one decode step) by component."""

    vision: float = 0.0
    projector: float = 0.0
    llm_prefill: float = 0.0
    lm_head: float = 0.0
    decode_per_token: float = 0.0
    #: a second LLM pass in the prefill (DAMRO's contrastive branch: text + outlier tokens, with its lm_head);
    #: its decode step is included in ``decode_per_token``
    branch_prefill: float = 0.0

    @property
    def prefill(self) -> float:
        return self.vision + self.projector + self.llm_prefill + self.lm_head + self.branch_prefill

    def to_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        d["prefill"] = self.prefill
        return d


def _sparse_layer(cfg: Any, layer: int | None) -> bool:
    """Whether decoder layer ``layer`` has a mixture-of-experts feed-forward block (Qwen-MoE's rule)."""
    if not (getattr(cfg, "num_experts", 0) or 0):
        return False
    if layer is None:
        return True
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return layer not in (getattr(cfg, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


def llm_layer_flops(cfg: Any, n_q: int, n_k: int, layer: int | None = None) -> float:
    """One decoder layer (index ``layer``, which matters for mixtures of experts) for ``n_q`` new tokens attending to
    ``n_k`` keys (batch 1). A sparse layer counts its router and the ``num_experts_per_tok`` experts per token."""
    d = cfg.hidden_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    d_q = cfg.num_attention_heads * hd
    d_kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * hd
    proj = 2 * n_q * d * (2 * d_q + 2 * d_kv)
    if _sparse_layer(cfg, layer):
        mlp = 2 * n_q * d * cfg.num_experts + 3 * 2 * n_q * cfg.num_experts_per_tok * d * cfg.moe_intermediate_size
    else:
        mlp = 3 * 2 * n_q * d * cfg.intermediate_size
    attn = 2 * 2 * n_q * n_k * d_q
    return float(proj + mlp + attn)


def llm_flops(cfg: Any, n_tokens: int, logits: int = 1, decode_context: int | None = None) -> tuple[float, ...]:
    """``(llm_prefill, lm_head, decode_per_token)`` for a prompt of ``n_tokens`` LLM tokens (batch 1).

    ``decode_context``: cache length the decode step attends to (default ``n_tokens``, the first new token).
    """
    layers = range(cfg.num_hidden_layers)
    prefill = sum(llm_layer_flops(cfg, n_tokens, n_tokens, i) for i in layers)
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    ctx = (decode_context if decode_context is not None else n_tokens) + 1
    decode = sum(llm_layer_flops(cfg, 1, ctx, i) for i in layers) + head
    return prefill, logits * head, decode


def llm_flops_in_llm_pruning(
    cfg: Any, n_tokens: int, n_kept: int, layer: int, logits: int = 1
) -> tuple[float, float, float]:
    """Like :func:`llm_flops` for a method that prunes inside the LLM (FastV): layers ``< layer`` process all
    ``n_tokens``, the others ``n_kept``; the decode step attends to ``n_tokens`` keys in the first layers and to
    ``n_kept`` in the rest."""
    first, later = range(layer), range(layer, cfg.num_hidden_layers)
    full = sum(llm_layer_flops(cfg, n_tokens, n_tokens, i) for i in first)
    rest = sum(llm_layer_flops(cfg, n_kept, n_kept, i) for i in later)
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    decode = (
        sum(llm_layer_flops(cfg, 1, n_tokens + 1, i) for i in first)
        + sum(llm_layer_flops(cfg, 1, n_kept + 1, i) for i in later)
        + head
    )
    return full + rest, logits * head, decode


def _clip_flops(
    vc: Any, n_images: int, vit_layers: int, patches: int | None = None, pooled: tuple[int, int] | None = None
) -> float:
    """CLIP tower FLOPs: ``patches`` patches per image (default: the configured grid); ``pooled = (layer, P2)``:
    the blocks after ``layer`` run on ``P2`` patches (fastvlm's encoder_pool)."""
    p = vc.patch_size
    P = patches if patches is not None else (vc.image_size // p) ** 2
    d, f = vc.hidden_size, vc.intermediate_size

    def per_layer(n: int) -> int:
        n += 1  # CLS
        return 8 * n * d * d + 4 * n * d * f + 4 * n * n * d

    layers = sum(per_layer(pooled[1] if pooled is not None and i > pooled[0] else P) for i in range(vit_layers))
    return float(n_images * (2 * P * 3 * p * p * d + layers))


def _siglip_flops(vc: Any, n_inputs: int) -> float:
    """SigLIP tower FLOPs (LLaVA-OneVision): every block on the ``(image_size / patch)^2`` patches (no CLS), and,
    where the config keeps it (``vision_use_head``; LLaVA-OneVision's checkpoints drop it), the attention-pooling
    head: one probe query over the patches, its projections and MLP on that one token."""
    p = vc.patch_size
    P = (vc.image_size // p) ** 2
    d, f = vc.hidden_size, vc.intermediate_size
    per_input = 2 * P * 3 * p * p * d + vc.num_hidden_layers * (8 * P * d * d + 4 * P * d * f + 4 * P * P * d)
    if getattr(vc, "vision_use_head", True):
        per_input += 2 * d * d + 4 * P * d * d + 4 * P * d + 2 * d * d + 4 * d * f  # q; k, v; scores, mix; out; MLP
    return float(n_inputs * per_input)


def _qwen_vision_flops(vc: Any, grids: list[tuple[int, int, int]], window: bool, qwen3: bool = False) -> float:
    m = vc.spatial_merge_size
    d = getattr(vc, "embed_dim", None) if not (window or qwen3) else vc.hidden_size
    d = d or vc.hidden_size
    mergers = 1
    if window:  # Qwen2.5-VL: gated MLP, window attention except in fullatt blocks
        f, mlp_mult = vc.intermediate_size, 6
        d_out = vc.out_hidden_size
    elif qwen3:  # Qwen3-VL: plain MLP; DeepStack adds one merger per tapped block
        f, mlp_mult = vc.intermediate_size, 4
        d_out = vc.out_hidden_size
        mergers += len(getattr(vc, "deepstack_visual_indexes", None) or [])
    else:
        f, mlp_mult = int(d * vc.mlp_ratio), 4
        d_out = vc.hidden_size
    S = sum(t * h * w for t, h, w in grids)
    patch = 2 * S * (vc.in_channels * vc.temporal_patch_size * vc.patch_size**2) * d
    full_chunks = sum(t * (h * w) ** 2 for t, h, w in grids)
    win_chunks = full_chunks
    if window:
        win = vc.window_size // m // vc.patch_size  # window side in merged tokens
        win_chunks = 0
        for t, h, w in grids:
            hm, wm = h // m, w // m
            for r0 in range(0, hm, win):
                for c0 in range(0, wm, win):
                    n = (min(win, hm - r0) * min(win, wm - c0)) * m * m
                    win_chunks += t * n * n
    total = patch
    depth = vc.depth
    full = set(getattr(vc, "fullatt_block_indexes", None) or range(depth)) if window else set(range(depth))
    for i in range(depth):
        chunks = full_chunks if i in full else win_chunks
        total += 2 * S * d * 3 * d + 2 * S * d * d + mlp_mult * S * d * f + 4 * d * chunks
    dm = d * m * m
    total += mergers * (2 * (S // (m * m)) * dm * dm + 2 * (S // (m * m)) * dm * d_out)
    return float(total)


def vision_flops(
    model_config: Any,
    *,
    n_images: int = 0,
    grids: list[tuple[int, int, int]] | None = None,
    vit_layers: int | None = None,
    config: Any = None,
) -> tuple[float, float]:
    """``(vision tower, projector)`` FLOPs for the images of one prompt.

    LLaVA: ``n_images`` images; ``vit_layers`` = blocks run (default: all of them). LLaVA-NeXT: ``n_images``
    counts the tower's inputs, i.e. every image's base view and high-resolution crops (:func:`anyres_crops`).
    LLaVA-OneVision: ``n_images`` counts the SigLIP tower's inputs (:func:`onevision_tower_inputs`: crops of a
    sample's only image, one base view per image of a multi-image sample, one per video frame). Qwen-VL:
    ``grids`` = ``(t, h, w)`` patch grids (the merger is counted in the vision tower, as it lives there).
    ``config``: a ``fastvlm`` config makes the encoder's own work shrink (``resolution``: the smaller input;
    ``encoder_pool``: the blocks after its layer on the pooled grid, and the projector on the reduced tokens).
    """
    mt = model_config.model_type
    if mt not in FLOP_MODEL_TYPES:
        raise ValueError(f"no FLOP formula for model_type {mt!r} (formulas: {', '.join(FLOP_MODEL_TYPES)})")
    vc = model_config.vision_config
    strategy = getattr(config, "strategy", None) if getattr(config, "name", None) == "fastvlm" else None
    if mt in ("llava", "llava_next"):
        if vit_layers is None:
            vit_layers = vc.num_hidden_layers
        side = vc.image_size // vc.patch_size
        P = side * side
        P_in, P_out, pooled = P, P, None
        if strategy in ("resolution", "encoder_pool"):
            h2, w2 = config.build().reduced_grid(side, side)  # the grid the adapter's hooks make
            P_out = h2 * w2
            if strategy == "resolution":
                P_in = P_out
            else:
                from .patches.llava import LlavaAdapter

                pooled = (LlavaAdapter.encoder_pool_layer(model_config, config.layer), P_out)
        dt = model_config.text_config.hidden_size
        proj = n_images * (2 * P_out * vc.hidden_size * dt + 2 * P_out * dt * dt)
        return _clip_flops(vc, n_images, vit_layers, P_in, pooled), float(proj)
    if mt == "llava_onevision":
        if strategy in ("resolution", "encoder_pool"):  # refused by the adapter too: it has no such hooks
            raise ValueError(f"no FLOP formula for fastvlm's {strategy!r} strategy on {mt!r} (only 'pool' runs there)")
        side = vc.image_size // vc.patch_size
        P_out = side * side - (model_config.vision_feature_select_strategy == "default")  # drops a real patch
        layers = model_config.vision_feature_layer
        d_in = vc.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
        dt = model_config.text_config.hidden_size
        proj = n_images * (2 * P_out * d_in * dt + 2 * P_out * dt * dt)
        return _siglip_flops(vc, n_images), float(proj)
    if mt in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        grids = list(grids or [])
        if strategy == "resolution":
            method, m = config.build(), vc.spatial_merge_size
            small = []
            for t, h, w in grids:
                h2, w2 = method.reduced_grid(h // m, w // m, t)  # the grid the adapter's hooks make
                small.append((t, h2 * m, w2 * m))
            grids = small
        return _qwen_vision_flops(vc, grids, window=mt == "qwen2_5_vl", qwen3=mt.startswith("qwen3")), 0.0
    raise AssertionError(f"FLOP_MODEL_TYPES lists {mt!r} but vision_flops has no branch for it")


def anyres_crops(model_config: Any, image_sizes: Any) -> list[int]:
    """LLaVA-NeXT: the tower inputs (base view + high-resolution crops) of each image of ``(H, W)`` in
    ``image_sizes`` (``(n, 2)``), by transformers' own rule for the model's ``image_grid_pinpoints``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
    return [
        int(
            image_size_to_num_patches(
                image_size=[int(v) for v in hw],
                grid_pinpoints=model_config.image_grid_pinpoints,
                patch_size=model_config.vision_config.image_size,
            )
        )
        for hw in sizes
    ]


def onevision_tower_inputs(
    model_config: Any, image_sizes: Any = None, batch_num_images: Any = None, video_frames: Any = ()
) -> int:
    """LLaVA-OneVision: how many SigLIP inputs one prompt's images and videos make.

    Args:
        image_sizes: ``(n, 2)`` ``(H, W)`` of the prompt's images (``None``: no image).
        batch_num_images: images per sample, as the model gets it; a sample with one image is split into anyres
            crops (:func:`anyres_crops`), every image of a multi-image sample runs once, as its base view.
            ``None`` means one image per sample (the model's own default).
        video_frames: frames of each video (every frame is one tower input).
    """
    n = sum(int(f) for f in video_frames)
    if image_sizes is None:
        return n
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
    lone = onevision_lone_images(batch_num_images, len(sizes))
    return n + sum(c if one else 1 for c, one in zip(anyres_crops(model_config, sizes), lone, strict=True))


def onevision_lone_images(batch_num_images: Any, n_images: int) -> list[bool]:
    """LLaVA-OneVision's rule, per image in batch order: is it its sample's only image (then it is split into
    anyres crops; an image of a multi-image sample runs as its base view only)? ``batch_num_images`` ``(samples,)``
    images per sample, or ``None``: every image alone, as the model assumes without it."""
    if batch_num_images is None:
        return [True] * n_images
    return [int(c) == 1 for c in batch_num_images for _ in range(int(c))]


def prefill_flops(
    model_config: Any,
    *,
    n_text: int,
    vision_in: int,
    vision_out: int,
    config: Any = None,
    n_images: int = 0,
    grids: list[tuple[int, int, int]] | None = None,
    vit_layers: int | None = None,
) -> FlopBreakdown:
    """Analytic FLOPs of one prompt's prefill (batch 1) under a vlmprune config.

    Args:
        model_config: the VLM's config (``model.config``).
        n_text: the prompt's text tokens (everything but the vision placeholders).
        vision_in: vision tokens the processor emitted (placeholders in ``input_ids``).
        vision_out: vision tokens that reach the LLM (FastV: the tokens of layers ``>= layer``); ``vision_in``
            when unpatched.
        config: the :class:`~vlmprune.PruneConfig` the model is patched with (``None``: unpatched). FastV counts
            its first layers on all tokens; DAMRO adds its contrastive branch (text + ``top_k`` outliers) to
            ``branch_prefill`` and to the decode step.
        n_images / grids / vit_layers: the vision work, as in :func:`vision_flops`.

    Raises:
        ValueError: the model type has no FLOP formula (see :func:`vision_flops`).
    """
    inner = config.prune_config() if getattr(config, "name", None) == "damro" else config
    vision, proj = vision_flops(model_config, n_images=n_images, grids=grids, vit_layers=vit_layers, config=inner)
    tc = model_config.get_text_config()
    damro = config if getattr(config, "name", None) == "damro" else None
    inner = damro.prune_config() if damro is not None else config
    if inner is not None and inner.name == "fastv":
        llm, head, dec = llm_flops_in_llm_pruning(tc, n_text + vision_in, n_text + vision_out, inner.layer)
    else:
        llm, head, dec = llm_flops(tc, n_text + vision_out)
    branch = 0.0
    if damro is not None and damro.alpha > 0:  # the contrastive branch: text + top_k outliers, its own cache
        b_llm, b_head, b_dec = llm_flops(tc, n_text + min(damro.top_k, vision_in))
        branch = b_llm + b_head
        dec += b_dec
    return FlopBreakdown(vision, proj, llm, head, dec, branch)


_registered = False


def register_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU SDPA kernel (torch registers only the CUDA ones); idempotent.

    This mutates torch's global formula registry, once, with the same formula torch uses on GPU.
    """
    global _registered
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if _registered or op is None or op in flop_registry or op.default in flop_registry:
        _registered = True
        return

    @register_flop_formula(op, get_raw=True)
    def _sdpa_cpu(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    _registered = True


def count_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **forward_kwargs: Any) -> dict[str, float]:
    """FLOPs of one forward measured by ``FlopCounterMode``, by component (same keys as :class:`FlopBreakdown`
    minus ``decode_per_token``)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_flops()
    with torch.no_grad(), FlopCounterMode(display=False, depth=4) as fc:
        model(**inputs, **forward_kwargs)
    counts = {k: float(sum(v.values())) for k, v in fc.get_flop_counts().items()}
    top = type(model).__name__
    vlm = f"{top}.model"

    def get(name: str) -> float:
        return counts.get(name, 0.0)

    vision = get(f"{vlm}.vision_tower") + get(f"{vlm}.visual")
    return {
        "vision": vision,
        "projector": get(f"{vlm}.multi_modal_projector"),
        "llm_prefill": get(f"{vlm}.language_model"),
        "lm_head": get(f"{top}.lm_head"),
        "prefill": get("Global"),
    }
