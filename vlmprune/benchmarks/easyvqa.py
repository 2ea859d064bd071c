"""easy-VQA (https://pypi.org/project/easy-vqa, MIT): 64x64 images of one coloured shape, with questions.

A dataset nobody on this project wrote, used next to ShapesVQA. The ``easy-vqa`` package (about 3 MB, in the
``eval`` extra) ships the images and questions; nothing is downloaded at run time.

Splits: ``train`` = the package's training images 0-3499 (with their questions), ``val`` = training images
3500-3999 (held out from training), ``test`` = the package's test split. Question types follow the wording:
``shape`` ("what shape ..."), ``colour`` ("what color ..."), ``yes/no`` (everything answered yes or no).
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUESTION_TYPES", "grouped", "load_image", "rows", "vocabulary"]

QUESTION_TYPES = ("shape", "colour", "yes/no")
VAL_FROM = 3500


def _package() -> Any:
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("easy-VQA needs the `easy-vqa` package: pip install 'vlmprune[eval]'") from e
    return easy_vqa


def _qtype(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if "shape" in question.split()[:2] or answer in ("circle", "rectangle", "triangle") else "colour"


def _raw(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    ev = _package()
    if split in ("train", "val"):
        q, a, ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()
    elif split == "test":
        q, a, ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    else:
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    keep = [i for i, k in enumerate(ids) if split == "test" or (k >= VAL_FROM) == (split == "val")]
    return [q[i] for i in keep], [a[i] for i in keep], [ids[i] for i in keep], paths


def grouped(split: str = "train") -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Image paths of ``split`` and, for each, its ``(question, answer)`` pairs (sorted by image id)."""
    q, a, ids, paths = _raw(split)
    by: dict[int, list[tuple[str, str]]] = {}
    for qq, aa, k in zip(q, a, ids, strict=True):
        by.setdefault(k, []).append((qq, aa))
    keys = sorted(by)
    return [paths[k] for k in keys], [by[k] for k in keys]


def load_image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def size(split: str = "test") -> int:
    """How many questions ``split`` has (what :func:`rows` returns without ``n``), without loading images."""
    return len(_raw(split)[0])


def rows(split: str = "test", n: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{id, image, question, answer, question_type}`` of ``split``, in the package's order.

    ``n`` takes an evenly spaced subset of that many rows (deterministic), so a small ``n`` still covers every
    image range and question type.
    """
    q, a, ids, paths = _raw(split)
    index = list(range(len(q)))
    if n is not None and n < len(index):
        index = [round(i * len(q) / n) for i in range(n)]
    cache: dict[int, Any] = {}
    out = []
    for i in index:
        k = ids[i]
        if k not in cache:
            cache[k] = load_image(paths[k])
        out.append(
            {
                "id": f"{split}-{i:05d}",
                "image": cache[k],
                "question": q[i],
                "answer": a[i],
                "question_type": _qtype(q[i], a[i]),
            }
        )
    return out


def vocabulary() -> list[str]:
    """Every word of the package's questions and answers."""
    import re

    words: set[str] = set()
    for split in ("train", "test"):
        q, a, _, _ = _raw(split)
        for text in q + a:
            words |= set(re.findall(r"\w+|[^\w\s]", text))
    return sorted(words)
