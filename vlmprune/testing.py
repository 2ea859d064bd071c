"""Tiny random-weight models of every supported family, and inputs for them, built offline from configs.

Used by the test-suite, the demo and the benchmarks; handy for users who want to try a method without a
checkpoint. Nothing here downloads anything. transformers is imported inside the functions only.

Sample specs: a sample is a list of items, an ``int`` = that many random text tokens, ``"image"`` = one image
(LLaVA: the fixed CLIP grid; LLaVA-NeXT / OneVision: ``("image", H, W)`` in pixels, default 48 x 80, anyres crops
of 56 px; Qwen: ``("image", h, w)`` in patches, default 8x8), ``("video", t, h, w)`` a Qwen video (OneVision:
``("video", t)``, ``t`` frames of 56 px). Example:
``[[5, "image", 3], [2, ("image", 8, 12), 4, "image", 1]]``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILIES", "LLAVA_SIZES", "tiny_model", "make_inputs"]

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "fast_vlm")

_VOCAB = 160
_IMAGE, _VIDEO, _VSTART, _VEND, _PAD = 150, 151, 152, 153, 0


def _text_cfg(**over: Any) -> dict[str, Any]:
    cfg = dict(
        vocab_size=_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,  # > FastV's default K=2
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=_PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(over)
    return cfg


# LLaVA geometries: "tiny" for tests; "demo" = LLaVA-1.5's 336 px / 576 tokens with small widths (fast demo);
# "bench" = CLIP-L-sized tower (6 of its 24 layers) + a 12-layer d=1024 Llama, sized so a 2-core CPU prefill
# takes about a second (the benchmark's model; see eval/bench_prefill.py).
LLAVA_SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        ),
        {},
    ),
    "demo": (
        dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            projection_dim=256,
        ),
        dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            vocab_size=32064,
        ),
    ),
    "bench": (
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=6,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            vocab_size=32064,
        ),
    ),
}


def _llava_config(family: str, vision: dict[str, Any], text: dict[str, Any], **over: Any) -> Any:
    """A LLaVA-1.5 (``"llava"``) or LLaVA-NeXT (``"llava_next"``) config: a CLIP tower of ``vision``, a Llama LLM of
    ``text`` (see :func:`_text_cfg`), LLaVA's features (layer -2, ``"default"``, CLS dropped) and this module's
    image token; ``over`` adds or replaces top-level keys (e.g. NeXT's ``image_grid_pinpoints``)."""
    import transformers as tf

    kw: dict[str, Any] = dict(
        vision_config=tf.CLIPVisionConfig(**vision),
        text_config=tf.LlamaConfig(**text),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    # the releases' own argument names (5.0's LlavaNextConfig has no image_token_id parameter)
    kw["image_token_index" if family == "llava_next" else "image_token_id"] = _IMAGE
    kw.update(over)
    return (tf.LlavaNextConfig if family == "llava_next" else tf.LlavaConfig)(**kw)


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    size: str = "tiny",
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **over: Any,
) -> torch.nn.Module:
    """A randomly initialised ``*ForConditionalGeneration`` of ``family`` (see :data:`FAMILIES`), in eval mode.

    LLaVA: CLIP tower 56 px / patch 14 (4x4 = 16 tokens per image, CLS dropped), Llama LLM d=64, 2 layers;
    ``size="demo"`` / ``"bench"`` give LLaVA-1.5's 336 px and 576 tokens per image (see :data:`LLAVA_SIZES`).
    Qwen2-VL / 2.5-VL: ViT patch 4, merge 2 (an ``h x w``-patch image gives ``h*w/4`` tokens), LLM d=64 with
    M-RoPE sections [4, 2, 2]. ``over`` updates the top-level config kwargs.
    """
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llava":
        vision, text = LLAVA_SIZES[size]
        cfg = _llava_config(family, vision, _text_cfg(**text), **over)
        cls = tf.LlavaForConditionalGeneration
    elif family == "llava_next":  # anyres: 56 px crops (4 x 4 tokens each), grids of up to 2 x 2 crops
        if size != "tiny":
            raise ValueError(f"size={size!r} exists for llava only; llava_next comes in size='tiny'")
        vision, _ = LLAVA_SIZES["tiny"]
        kw: dict[str, Any] = {"image_grid_pinpoints": [[56, 112], [112, 56], [112, 112]]}
        kw.update(over)
        cfg = _llava_config(family, vision, _text_cfg(), **kw)
        cls = tf.LlavaNextForConditionalGeneration
    elif family == "llava_onevision":  # SigLIP (no CLS) 56 px crops; anyres_max_2: a 2 x 2 crop grid is interpolated
        if size != "tiny":
            raise ValueError(f"size={size!r} exists for llava only; llava_onevision comes in size='tiny'")
        vision, _ = LLAVA_SIZES["tiny"]
        vision = {k: v for k, v in vision.items() if k != "projection_dim"}
        kw = dict(
            vision_config=tf.SiglipVisionConfig(**vision),
            text_config=tf.Qwen2Config(**_text_cfg()),
            image_token_index=_IMAGE,
            video_token_index=_VIDEO,
            image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
            vision_aspect_ratio="anyres_max_2",
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
        )
        kw.update(over)
        cfg = tf.LlavaOnevisionConfig(**kw)
        cls = tf.LlavaOnevisionForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0}
        if family in ("qwen3_vl", "qwen3_vl_moe"):
            rope["mrope_interleaved"] = True
        text = _text_cfg(rope_parameters=rope)
        vision = dict(
            depth=2,
            hidden_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        if family == "qwen2_vl":
            vision.update(embed_dim=32, mlp_ratio=2)
            cfg_cls, cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        elif family in ("qwen3_vl", "qwen3_vl_moe"):  # DeepStack: 3 ViT blocks feed LLM layers 0-2 (FastV's K=2)
            vision.update(
                depth=3,
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=64,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0, 1, 2],
            )
            text.update(head_dim=16, num_hidden_layers=4)  # a layer after the last DeepStack one (FastV's K=2)
            if family == "qwen3_vl_moe":  # sparse MoE blocks in every LLM layer (4 experts, 2 per token)
                text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
                cfg_cls, cls = tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeForConditionalGeneration
            else:
                cfg_cls, cls = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration
        else:
            vision.update(
                intermediate_size=64, out_hidden_size=64, hidden_size=32, window_size=16, fullatt_block_indexes=[1]
            )
            cfg_cls, cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        kw = dict(
            text_config=text,
            vision_config=vision,
            image_token_id=_IMAGE,
            video_token_id=_VIDEO,
            vision_start_token_id=_VSTART,
            vision_end_token_id=_VEND,
            pad_token_id=_PAD,
        )
        kw.update(over)
        cfg = cfg_cls(**kw)
        if size != "tiny":
            raise ValueError(f"size={size!r} exists for llava only; Qwen families come in size='tiny'")
    elif family == "fast_vlm":
        # a native ConvNeXt (no timm) stands in for FastViTHD: a 32 px image -> a 4 x 4 feature map (stride 8)
        vision = tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4, image_size=32)
        vision.hidden_size = vision.hidden_sizes[-1]  # what FastVLM's projector reads (timm configs have it)
        kw = dict(vision_config=vision, text_config=tf.Qwen2Config(**_text_cfg()), image_token_index=_IMAGE)
        kw.update(over)
        cfg = tf.FastVlmConfig(**kw)
        cls = tf.FastVlmForConditionalGeneration
        if size != "tiny":
            raise ValueError(f"size={size!r} exists for llava only")
        # the conv tower has no attention to choose; the LLM keeps the requested one
        attn_implementation = {"": attn_implementation, "text_config": attn_implementation, "vision_config": "eager"}
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def _pad(rows: list[list[int]], extras: list[list[int]], side: str) -> tuple[torch.Tensor, ...]:
    L = max(len(r) for r in rows)
    ids, mask, ext = [], [], []
    for r, e in zip(rows, extras, strict=True):
        n = L - len(r)
        if side == "left":
            ids.append([_PAD] * n + r), mask.append([0] * n + [1] * len(r)), ext.append([0] * n + e)
        else:
            ids.append(r + [_PAD] * n), mask.append([1] * len(r) + [0] * n), ext.append(e + [0] * n)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(ext)


def _next_tokens(model: torch.nn.Module, height: int, width: int, anyres: bool = True) -> tuple[int, int]:
    """LLaVA-NeXT / OneVision: ``(placeholder tokens, crops)`` of an image of ``height x width`` pixels, from the
    model's own crop count and packing code (what its processor expands ``<image>`` to). ``anyres=False``: the
    base view only (OneVision, in a sample with several images)."""
    import sys

    vlm = model.model
    mod = sys.modules[type(vlm).__module__]
    cfg = model.config
    vc = cfg.vision_config
    n_crops = int(
        mod.image_size_to_num_patches(
            image_size=[height, width], grid_pinpoints=cfg.image_grid_pinpoints, patch_size=vc.image_size
        )
    )
    size = torch.tensor([[height, width]])
    if cfg.model_type == "llava_onevision":  # SigLIP: no CLS, every patch reaches the projector
        n_crops = n_crops if anyres else 1
        feats = torch.zeros(n_crops, (vc.image_size // vc.patch_size) ** 2, 1)
        packed, _ = vlm.pack_image_features(
            [feats], size, image_newline=torch.zeros(1), vision_aspect_ratio=cfg.vision_aspect_ratio
        )
        return int(packed[0].shape[0]), n_crops
    per_crop = (vc.image_size // vc.patch_size) ** 2 + (cfg.vision_feature_select_strategy == "full")
    feats = torch.zeros(n_crops, per_crop, 1)
    packed, _ = vlm.pack_image_features(
        [feats], size, cfg.vision_feature_select_strategy, image_newline=torch.zeros(1)
    )
    return int(packed[0].shape[0]), n_crops


def make_inputs(
    model: torch.nn.Module, samples: list[list[Any]], *, padding_side: str = "left", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs as the family's processor would build them (placeholders expanded, pixels, grids, masks).

    Text tokens and pixels are random but deterministic in ``seed`` and the sample's content: the same sample
    spec at the same position in ``samples`` gives the same tokens and images regardless of the other samples.
    """
    cfg = model.config
    family = cfg.model_type
    dtype = next(model.parameters()).dtype
    rows, types, pixels, grids, vgrids, vpixels = [], [], [], [], [], []
    sizes: list[list[int]] = []
    per_sample: list[int] = []  # images per sample (OneVision: a sample with several images gets no crops)
    for si, sample in enumerate(samples):
        n_images = sum(1 for it in sample if it == "image" or (isinstance(it, tuple) and it[0] == "image"))
        per_sample.append(n_images)
        gen = torch.Generator().manual_seed(seed * 1000 + si)
        ids: list[int] = []
        tt: list[int] = []
        for item in sample:
            if isinstance(item, int):
                ids += torch.randint(3, 100, (item,), generator=gen).tolist()
                tt += [0] * item
                continue
            spec = (item,) if isinstance(item, str) else tuple(item)
            kind = spec[0]
            if family == "fast_vlm":
                if kind != "image":
                    raise ValueError("FastVLM takes images only")
                size = cfg.vision_config.image_size
                stride = cfg.vision_config.patch_size * 2 ** (cfg.vision_config.num_stages - 1)
                n = (size // stride) ** 2
                ids += [_IMAGE] * n
                tt += [1] * n
                pixels.append(torch.randn(3, size, size, generator=gen))
                continue
            if family == "llava_onevision" and kind == "video":
                t = spec[1] if len(spec) > 1 else 2
                size = cfg.vision_config.image_size
                side = size // cfg.vision_config.patch_size
                n = t * model.model.apply_pooling(torch.zeros(1, side * side, 1)).shape[1] + 1  # + one newline
                ids += [_VIDEO] * n
                tt += [2] * n
                vpixels.append(torch.randn(t, 3, size, size, generator=gen))
                continue
            if family in ("llava_next", "llava_onevision"):
                if kind != "image":
                    raise ValueError(f"{family} takes images only here")
                H, W = spec[1:] if len(spec) > 1 else (48, 80)
                n, n_crops = _next_tokens(model, H, W, anyres=n_images == 1)
                ids += [_IMAGE] * n
                tt += [1] * n
                size = cfg.vision_config.image_size
                pixels.append(torch.randn(n_crops, 3, size, size, generator=gen))
                sizes.append([H, W])
                continue
            if family == "llava":
                if kind != "image":
                    raise ValueError("LLaVA takes images only")
                vc = cfg.vision_config
                side = vc.image_size // vc.patch_size
                n = side * side + (1 if cfg.vision_feature_select_strategy == "full" else 0)
                ids += [_IMAGE] * n
                tt += [1] * n
                pixels.append(torch.randn(3, vc.image_size, vc.image_size, generator=gen))
                continue
            vc = cfg.vision_config
            m, tp, p = vc.spatial_merge_size, vc.temporal_patch_size, vc.patch_size
            if kind == "image":
                t, h, w = 1, *(spec[1:] if len(spec) > 1 else (8, 8))
            else:
                t, h, w = spec[1:] if len(spec) > 1 else (2, 8, 8)
            n = t * h * w // (m * m)
            tok = _IMAGE if kind == "image" else _VIDEO
            if kind == "video" and family in ("qwen3_vl", "qwen3_vl_moe"):  # one <t> <start> frame <end> per frame
                per_frame = n // t
                for _ in range(t):
                    ids += [int(torch.randint(3, 100, (1,), generator=gen))] + [_VSTART] + [tok] * per_frame + [_VEND]
                    tt += [0, 0] + [2] * per_frame + [0]
            else:
                ids += [_VSTART] + [tok] * n + [_VEND]
                tt += [0] + [1 if kind == "image" else 2] * n + [0]
            patches = torch.randn(t * h * w, vc.in_channels * tp * p * p, generator=gen)
            (pixels if kind == "image" else vpixels).append(patches)
            (grids if kind == "image" else vgrids).append([t, h, w])
        rows.append(ids)
        types.append(tt)
    input_ids, attention_mask, mm_types = _pad(rows, types, padding_side)
    out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family in ("llava", "fast_vlm"):
        if pixels:
            out["pixel_values"] = torch.stack(pixels).to(dtype)
        return out
    if family in ("llava_next", "llava_onevision"):  # as the processor: (images, most crops, C, S, S), zero-padded
        if pixels:
            most = max(p.shape[0] for p in pixels)
            padded = [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in pixels]
            out["pixel_values"] = torch.stack(padded).to(dtype)
            out["image_sizes"] = torch.tensor(sizes)
            if family == "llava_onevision":
                out["batch_num_images"] = torch.tensor(per_sample)
        if vpixels:  # OneVision videos: (videos, frames, C, S, S)
            if len({v.shape[0] for v in vpixels}) > 1:
                raise ValueError("the videos of one LLaVA-OneVision batch must have the same number of frames")
            out["pixel_values_videos"] = torch.stack(vpixels).to(dtype)
        return out
    import inspect

    if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:  # transformers >= ~5.8
        out["mm_token_type_ids"] = mm_types
    if pixels:
        out["pixel_values"] = torch.cat(pixels).to(dtype)
        out["image_grid_thw"] = torch.tensor(grids)
    if vpixels:
        out["pixel_values_videos"] = torch.cat(vpixels).to(dtype)
        out["video_grid_thw"] = torch.tensor(vgrids)
    return out
