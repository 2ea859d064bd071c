"""Build the shipped tiny VLMs offline: word-level tokenizer, processor (with chat template) and model.

Everything here is built from configs and word lists; nothing is downloaded. The result is a standard
transformers checkpoint: ``LlavaForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` +
``AutoProcessor``, so ``from_pretrained(path)`` works without vlmprune.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PROMPT_WORDS = ("USER", "ASSISTANT", ":")

# Chat templates: "USER: <image>\n{question} ASSISTANT:" (LLaVA-1.5's layout) and its Qwen analogue.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = LLAVA_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")

SPECIALS = {
    "llava": ["<pad>", "<unk>", "<s>", "</s>", "<image>"],
    "qwen2_vl": [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|video_pad|>",
    ],
}


def build_tokenizer(family: str, words: list[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: specials first, then ``words`` (sorted, deduplicated).

    Pre-tokenisation splits on whitespace and punctuation, so ``"USER: is it?"`` -> USER : is it ?.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in sorted(set(words) | set(PROMPT_WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials[4:],
        padding_side="left",
        model_max_length=2048,
    )
    return fast


def build_processor(family: str, tokenizer: Any, image_size: int, patch_size: int) -> Any:
    """The family's processor for square ``image_size`` images with ViT patches of ``patch_size``."""
    import transformers as tf

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP's
    if family == "llava":
        cls = getattr(tf, "CLIPImageProcessorPil", None) or tf.CLIPImageProcessor
        ip = cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            image_mean=mean,
            image_std=std,
        )
        return tf.LlavaProcessor(
            image_processor=ip,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
    if family == "qwen2_vl":
        cls = getattr(tf, "Qwen2VLImageProcessorPil", None) or tf.Qwen2VLImageProcessor
        pixels = image_size * image_size
        ip = cls(
            patch_size=patch_size,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels},
            image_mean=mean,
            image_std=std,
        )
        from vlmprune.benchmarks._processors import image_only

        # transformers 5 wants torchvision for Qwen2-VL's video processor; these checkpoints are image-only
        return image_only(tf.Qwen2VLProcessor)(image_processor=ip, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    raise ValueError(f"unknown family {family!r}")


def build_model(family: str, tokenizer: Any, arch: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model; ``arch`` holds image_size, patch_size, vision/LLM widths and depths."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch["llm_hidden"],
        intermediate_size=arch["llm_hidden"] * 4,
        num_hidden_layers=arch["llm_layers"],
        num_attention_heads=arch["llm_heads"],
        num_key_value_heads=arch["llm_heads"],
        max_position_embeddings=2048,
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<s>"),
        eos_token_id=ids("</s>"),
        tie_word_embeddings=True,
    )
    if family == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=arch["vit_hidden"],
            intermediate_size=arch["vit_hidden"] * 4,
            num_hidden_layers=arch["vit_layers"],
            num_attention_heads=arch["vit_heads"],
            image_size=arch["image_size"],
            patch_size=arch["patch_size"],
            projection_dim=arch["vit_hidden"],
        )
        cfg = tf.LlavaConfig(
            vision_config=vision,
            text_config=tf.LlamaConfig(**text),
            image_token_id=ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=(arch["image_size"] // arch["patch_size"]) ** 2,
            tie_word_embeddings=True,
        )
        cls = tf.LlavaForConditionalGeneration
    elif family == "qwen2_vl":
        head_dim = arch["llm_hidden"] // arch["llm_heads"]
        q = head_dim // 16  # M-RoPE sections (temporal, height, width): Qwen2-VL's 2:3:3 split of head_dim/2
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2 * q, 3 * q, 3 * q], "rope_theta": 1e4}
        vision = dict(
            depth=arch["vit_layers"],
            embed_dim=arch["vit_hidden"],
            hidden_size=arch["llm_hidden"],
            num_heads=arch["vit_heads"],
            mlp_ratio=4,
            patch_size=arch["patch_size"],
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        cfg = tf.Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            pad_token_id=ids("<pad>"),
            tie_word_embeddings=True,
        )
        cls = tf.Qwen2VLForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}")
    return cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def save_processor(processor: Any, out_dir: str | Path) -> None:
    """Save ``processor`` so every tested transformers 5.x release loads it with ``AutoProcessor``.

    Besides ``save_pretrained`` (5.x's nested ``processor_config.json``) the image processor is also written as
    ``preprocessor_config.json`` (what some 5.x releases read), the processor class is recorded as upstream's
    (not the image-only stand-in used to build it without torchvision), and Qwen2-VL gets a matching
    ``video_preprocessor_config.json`` so that ``AutoProcessor`` works where torchvision is installed.
    """
    out_dir = Path(out_dir)
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    cfg_file = out_dir / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    name = type(processor).__name__.removeprefix("ImageOnly")
    cfg["processor_class"] = name
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_cfg_file = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text())
    tok_cfg["processor_class"] = name
    tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    if name == "Qwen2VLProcessor":
        ip = processor.image_processor
        video = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "processor_class": name,
            "patch_size": ip.patch_size,
            "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "image_mean": list(ip.image_mean),
            "image_std": list(ip.image_std),
            "size": dict(ip.size),
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        }
        (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


def legacy_vision_keys(out_dir: str | Path) -> None:
    """Store a LLaVA checkpoint's CLIP weights as ``vision_tower.vision_model.*``, the hub layout every tested
    transformers release reads: recent releases save them flattened (``vision_tower.embeddings...``), which 5.0
    silently fails to map (it would leave the tower randomly initialised)."""
    from safetensors.torch import load_file, save_file

    f = Path(out_dir) / "model.safetensors"
    sd = load_file(f)
    prefix, legacy = "vision_tower.", "vision_tower.vision_model."
    out = {
        (legacy + k[len(prefix) :] if k.startswith(prefix) and not k.startswith(legacy) else k): v
        for k, v in sd.items()
    }
    save_file(out, f, metadata={"format": "pt"})
