"""Load a checkpoint's processor, with an image-only fallback for Qwen2-VL when torchvision is missing.

transformers 5 builds Qwen2-VL's processor with a *video* processor, which needs torchvision; on a machine
without it ``AutoProcessor.from_pretrained`` fails even for image-only use. :func:`load_processor` then builds
the same processor without its video part (images and text behave exactly as upstream's).
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

__all__ = ["image_only", "load_processor"]


def image_only(base: type) -> type:
    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        """``base`` without its video processor (its ``__init__`` lists only image processor and tokenizer)."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

        def to_dict(self) -> dict[str, Any]:  # saved as upstream's class, so the folder stays a normal checkpoint
            d = super().to_dict()
            d["processor_class"] = base.__name__
            return d

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


def load_processor(path: str | Path, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained(path)``; for Qwen2-VL-style processors without torchvision, the image-only
    equivalent (``processor.video_processor`` is then absent, so videos raise)."""
    import transformers as tf

    cfg_file = Path(path) / "processor_config.json"
    name = json.loads(cfg_file.read_text()).get("processor_class") if cfg_file.is_file() else None
    if isinstance(name, str):
        name = name.removeprefix("ImageOnly")  # folders saved by an older stand-in
    base = getattr(tf, name, None) if isinstance(name, str) else None
    if base is not None and "video_processor" in base.get_attributes() and find_spec("torchvision") is None:
        return image_only(base).from_pretrained(path, **kwargs)
    return tf.AutoProcessor.from_pretrained(path, **kwargs)
