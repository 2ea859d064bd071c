"""ShapesVQA: a deterministic synthetic VQA benchmark where *salient* and *relevant* differ.

Each 128x128 image has a textured background, 2-4 coloured **shapes** (the things questions ask about; 13-16 px,
centred in the cells of a 16-px grid and never in touching cells), one small low-contrast **dot** (6-7.5 px,
anywhere), and 3-6 larger high-contrast black/white **distractors** (blocks of static, speckle clouds) that no
question ever asks about, so a token selector that keeps "whatever stands out" keeps the distractors and loses
the answer.

Why the grid: a 16-px cell is exactly 2x2 ViT patches of 8 px (one merged token in Qwen2-VL), so every patch of
a shape holds a recognisable quarter of it. With free placement a from-scratch ViT trained on a CPU budget did
not learn to tell shapes apart at all (colour it learned in a few hundred steps, shape not in thousands); with
the grid it does, and nothing else about the benchmark changes (positions still vary over 64 cells).

Question types (one word answers, scored by exact match on the first word of the prediction):

==========  =====================================================  ==========================================
type        example                                                answers
==========  =====================================================  ==========================================
exist       ``is there a red circle?`` (POPE style; negatives are   yes / no (balanced)
            adversarial — colour and shape both in the image but
            not together — popular or random, see ``subtype``)
count       ``how many circles are there?`` /                       zero ... four
            ``how many red shapes are there?``
attribute   ``what colour is the triangle?`` /                      a colour / a shape
            ``what shape is the blue object?``
spatial     ``where is the red circle relative to the blue         left / right / above / below
            square?`` (the dominant axis differs by >= 10 px)
small       ``what colour is the dot?`` (a 6-7.5 px dot, blended   a colour
            40-50 % into the background)
==========  =====================================================  ==========================================

The dot is not a shape: "shapes" in questions (counts, "the circle", "the red object") are the 2-4 large ones
only, and the dot is only ever called "the dot" (it is drawn as a small disc, so a zero-shot model may read it as
a circle; the shipped checkpoints learn the convention).

Everything is a pure function of ``(split, index)``: ``sample(split, i)`` seeds a numpy generator with
``(SPLIT_SEEDS[split], i)``, so any image can be regenerated alone, and splits never share a generator stream.
With the same numpy and Pillow the same call gives byte-identical images on any machine (numpy's
``default_rng`` streams and Pillow's rasteriser may change between their releases: a test pins the scenes).
The fixed splits: ``train`` (an endless stream, the training scripts draw from it), ``val`` and ``test``
(1,000 questions each, the question types in turn).

Needs Pillow (and ``datasets`` for :func:`build_dataset`), both in the ``eval`` extra.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "ANSWERS",
    "COLOURS",
    "IMAGE_SIZE",
    "QUESTION_TYPES",
    "SHAPES",
    "SPLIT_SEEDS",
    "SPLIT_SIZES",
    "pope_sample",
    "Obj",
    "Scene",
    "build_dataset",
    "load_split",
    "render",
    "sample",
    "scene",
    "scene_questions",
]

IMAGE_SIZE = 128
CELL = 16  # shapes sit centred in cells of this grid (2x2 ViT patches of 8 px; one Qwen2-VL merged token)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")
QUESTION_TYPES = ("exist", "count", "attribute", "spatial", "small")
ANSWERS = ("yes", "no", *NUMBERS, *COLOURS, *SHAPES, *RELATIONS)
SPLIT_SEEDS = {"train": 1_000_003, "val": 2_000_003, "test": 3_000_017}
SPLIT_SIZES = {"val": 1000, "test": 1000}


@dataclass(frozen=True)
class Obj:
    """One drawn object: ``kind`` is ``"shape"``, ``"dot"`` or ``"distractor"``; ``x, y`` its centre (pixels)."""

    kind: str
    shape: str
    colour: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Scene:
    """A generated scene: the background seed and every object in drawing order."""

    background: tuple[int, int, int]
    objects: tuple[Obj, ...]

    @property
    def shapes(self) -> list[Obj]:
        return [o for o in self.objects if o.kind == "shape"]

    @property
    def dot(self) -> Obj:
        return next(o for o in self.objects if o.kind == "dot")


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def _free(x: float, y: float, r: float, placed: list[tuple[float, float, float]], gap: float) -> bool:
    return all(math.hypot(x - px, y - py) >= r + pr + gap for px, py, pr in placed)


def _place(rng: np.random.Generator, r: float, placed: list[tuple[float, float, float]], gap: float) -> tuple:
    margin = r + 2
    for _ in range(200):
        x, y = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
        if _free(x, y, r, placed, gap):
            placed.append((x, y, r))
            return float(x), float(y)
    return None


def _place_cell(rng: np.random.Generator, placed: list[tuple[float, float, float]]) -> tuple | None:
    """A free cell of the ``CELL``-px grid, not touching (8-neighbourhood) an occupied one; returns its centre."""
    n = IMAGE_SIZE // CELL
    for _ in range(200):
        cx, cy = (int(v) for v in rng.integers(0, n, size=2))
        x, y = cx * CELL + CELL / 2, cy * CELL + CELL / 2
        if all(max(abs(x - px), abs(y - py)) >= 2 * CELL for px, py, _ in placed):
            placed.append((x, y, CELL / 2 * 1.42))
            return x, y
    return None


def scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene description (no pixels) from ``rng``."""
    while True:
        placed: list[tuple[float, float, float]] = []
        objs: list[Obj] = []
        n = int(rng.integers(2, 5))
        # a small shape palette per image so that counts above one are common
        palette = rng.choice(len(SHAPES), size=int(rng.integers(1, 4)), replace=False)
        combos: set[tuple[str, str]] = set()
        ok = True
        for _ in range(n):
            for _ in range(50):
                shape = SHAPES[int(rng.choice(palette))]
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                if (colour, shape) not in combos:
                    break
            else:
                ok = False
                break
            size = float(rng.uniform(13, 16))
            pos = _place_cell(rng, placed)
            if pos is None:
                ok = False
                break
            combos.add((colour, shape))
            objs.append(Obj("shape", shape, colour, pos[0], pos[1], size))
        if not ok:
            continue
        dsize = float(rng.uniform(6, 7.5))
        pos = _place(rng, dsize / 2, placed, gap=6)
        if pos is None:
            continue
        objs.append(Obj("dot", "dot", list(COLOURS)[int(rng.integers(len(COLOURS)))], pos[0], pos[1], dsize))
        for _ in range(int(rng.integers(3, 7))):
            size = float(rng.uniform(9, 15))
            pos = _place(rng, size / 2 * 1.2, placed, gap=3)
            if pos is None:
                break
            kind = ("static", "speckle")[int(rng.integers(2))]
            objs.append(Obj("distractor", kind, ("white", "black")[int(rng.integers(2))], pos[0], pos[1], size))
        base = tuple(int(v) for v in rng.integers(95, 165, size=3))
        sc = Scene(background=base, objects=tuple(objs))
        if _spatial_pairs(sc) and _attribute_targets(sc):  # every question type must be askable
            return sc


def _background(rng: np.random.Generator, base: tuple[int, int, int]) -> np.ndarray:
    s = IMAGE_SIZE
    # low-frequency blotches + diagonal weave + grain: a texture, but quieter than any object
    coarse = rng.normal(0, 14, size=(9, 9, 3))
    yy, xx = np.meshgrid(np.linspace(0, 8, s), np.linspace(0, 8, s), indexing="ij")
    y0, x0 = np.floor(yy).astype(int).clip(0, 7), np.floor(xx).astype(int).clip(0, 7)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    blot = (
        coarse[y0, x0] * (1 - fy) * (1 - fx)
        + coarse[y0 + 1, x0] * fy * (1 - fx)
        + coarse[y0, x0 + 1] * (1 - fy) * fx
        + coarse[y0 + 1, x0 + 1] * fy * fx
    )
    period, phase = rng.uniform(5, 11), rng.uniform(0, 2 * math.pi)
    weave = 6 * np.sin((xx + yy) * s / 8 * 2 * math.pi / period + phase)[..., None]
    grain = rng.normal(0, 5, size=(s, s, 3))
    img = np.asarray(base, dtype=np.float64)[None, None] + blot + weave + grain
    return img.clip(0, 255)


def _draw_shape(draw: Any, shape: str, x: float, y: float, size: float, fill: tuple) -> None:
    r = size / 2
    if shape in ("circle", "dot"):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        r *= 0.9
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r * 1.1), (x - r * 1.1, y + r * 0.85), (x + r * 1.1, y + r * 0.85)], fill=fill)
    elif shape == "cross":
        t = r / 2.6
        draw.rectangle([x - r, y - t, x + r, y + t], fill=fill)
        draw.rectangle([x - t, y - r, x + t, y + r], fill=fill)
    else:  # pragma: no cover - guarded by the generator
        raise ValueError(shape)


def _draw_distractor(img: np.ndarray, rng: np.random.Generator, o: Obj) -> None:
    """High-contrast black/white clutter without clean edges: ``static`` is a block of random 2-px cells,
    ``speckle`` a loose cloud of 1-px dots; ``colour`` says which ink dominates."""
    s = IMAGE_SIZE
    r = o.size / 2
    x0, y0 = int(max(0, o.x - r)), int(max(0, o.y - r))
    x1, y1 = int(min(s, o.x + r)), int(min(s, o.y + r))
    h, w = y1 - y0, x1 - x0
    ink, other = (250.0, 10.0) if o.colour == "white" else (10.0, 250.0)
    if o.shape == "static":
        cells = rng.random(((h + 1) // 2, (w + 1) // 2)) < 0.5
        block = np.where(np.kron(cells, np.ones((2, 2)))[:h, :w, None], ink, other)
        img[y0:y1, x0:x1] = block
    else:
        mask = rng.random((h, w)) < 0.35
        img[y0:y1, x0:x1][mask] = ink


def render(sc: Scene, rng: np.random.Generator) -> Any:
    """Rasterise ``sc`` to a ``PIL.Image`` (RGB, ``IMAGE_SIZE`` square); texture noise comes from ``rng``."""
    from PIL import Image, ImageDraw

    bg = _background(rng, sc.background)
    canvas = bg.copy()
    for o in sc.objects:
        if o.kind == "distractor":
            _draw_distractor(canvas, rng, o)
    img = Image.fromarray(canvas.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in sc.objects:
        if o.kind == "distractor":
            continue
        col = np.asarray(COLOURS[o.colour], dtype=np.float64) + rng.integers(-15, 16, size=3)
        if o.kind == "dot":  # low contrast: blend towards the local background
            local = bg[int(o.y), int(o.x)]
            alpha = float(rng.uniform(0.5, 0.6))
            col = alpha * col + (1 - alpha) * local
        _draw_shape(draw, o.shape, o.x, o.y, o.size, tuple(int(v) for v in col.clip(0, 255).round()))
    return img


def _relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b``, if one axis clearly dominates (image y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(abs(dx) - abs(dy)) < 10 or max(abs(dx), abs(dy)) < 20:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _spatial_pairs(sc: Scene) -> list[tuple[Obj, Obj, str]]:
    out = []
    for a in sc.shapes:
        for b in sc.shapes:
            if a is not b and (rel := _relation(a, b)) is not None:
                out.append((a, b, rel))
    return out


def _attribute_targets(sc: Scene) -> tuple[list[Obj], list[Obj]]:
    """Objects whose shape (resp. colour) is unique in the scene, so "the triangle" names one object."""
    shapes = sc.shapes
    uniq_s = [o for o in shapes if sum(p.shape == o.shape for p in shapes) == 1]
    uniq_c = [o for o in shapes if sum(p.colour == o.colour for p in shapes) == 1]
    return (uniq_s, uniq_c) if uniq_s or uniq_c else ()


def _question(sc: Scene, qtype: str, rng: np.random.Generator) -> dict[str, str]:
    shapes = sc.shapes
    combos = {(o.colour, o.shape) for o in shapes}
    if qtype == "exist":
        if rng.random() < 0.5:
            o = shapes[int(rng.integers(len(shapes)))]
            c, s, answer, sub = o.colour, o.shape, "yes", "positive"
        else:
            present_c = sorted({o.colour for o in shapes})
            present_s = sorted({o.shape for o in shapes})
            adversarial = [(c, s) for c in present_c for s in present_s if (c, s) not in combos]
            popular = [(c, s) for c in COLOURS for s in present_s if c not in present_c]
            rand = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combos]
            u = rng.random()
            if adversarial and u < 0.6:
                pool, sub = adversarial, "adversarial"
            elif popular and u < 0.8:
                pool, sub = popular, "popular"
            else:
                pool, sub = rand, "random"
            c, s = pool[int(rng.integers(len(pool)))]
            answer = "no"
        article = "an" if c[0] in "aeiou" else "a"
        return {"question": f"is there {article} {c} {s}?", "answer": answer, "subtype": sub}
    if qtype == "count":
        # pick the answer first (zero 20 %, else uniform over the counts this scene has), then a target with it,
        # so that "one" does not dominate
        cands = [("shape", x, sum(o.shape == x for o in shapes)) for x in SHAPES]
        cands += [("colour", x, sum(o.colour == x for o in shapes)) for x in COLOURS]
        nonzero = sorted({n for _, _, n in cands if n > 0})
        n = 0 if rng.random() < 0.2 else nonzero[int(rng.integers(len(nonzero)))]
        pool = [c for c in cands if c[2] == n]
        kind, x, _ = pool[int(rng.integers(len(pool)))]
        q = f"how many {PLURAL[x]} are there?" if kind == "shape" else f"how many {x} shapes are there?"
        return {"question": q, "answer": NUMBERS[n], "subtype": kind}
    if qtype == "attribute":
        uniq_s, uniq_c = _attribute_targets(sc)
        if uniq_c and (not uniq_s or rng.random() < 0.5):
            o = uniq_c[int(rng.integers(len(uniq_c)))]
            return {"question": f"what shape is the {o.colour} object?", "answer": o.shape, "subtype": "shape"}
        o = uniq_s[int(rng.integers(len(uniq_s)))]
        return {"question": f"what colour is the {o.shape}?", "answer": o.colour, "subtype": "colour"}
    if qtype == "spatial":
        pairs = _spatial_pairs(sc)
        a, b, rel = pairs[int(rng.integers(len(pairs)))]
        q = f"where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?"
        return {"question": q, "answer": rel, "subtype": "horizontal" if rel in ("left", "right") else "vertical"}
    if qtype == "small":
        return {"question": "what colour is the dot?", "answer": sc.dot.colour, "subtype": "dot"}
    raise ValueError(f"unknown question type {qtype!r}; choose one of {QUESTION_TYPES}")


def scene_questions(split: str, index: int) -> tuple[Any, Scene, list[dict[str, str]]]:
    """Image ``index`` of ``split`` with one question of every type (the training scripts' unit).

    Returns ``(PIL image, scene, [ {question, answer, question_type, subtype} ] * len(QUESTION_TYPES))``.
    """
    rng = _rng(split, index)
    sc = scene(rng)
    img = render(sc, rng)
    qs = [dict(_question(sc, t, rng), question_type=t) for t in QUESTION_TYPES]
    return img, sc, qs


def _row(split: str, index: int, qtype: str, row_id: str) -> dict[str, Any]:
    """Image ``index`` of ``split`` with its question of type ``qtype``, as a benchmark row."""
    img, sc, qs = scene_questions(split, index)
    q = qs[QUESTION_TYPES.index(qtype)]
    return {
        "id": row_id,
        "image": img,
        "question": q["question"],
        "answer": q["answer"],
        "question_type": q["question_type"],
        "subtype": q["subtype"],
        "scene": json.dumps([asdict(o) for o in sc.objects]),
    }


def sample(split: str, index: int) -> dict[str, Any]:
    """Row ``index`` of ``split``: one image and one question, of type ``QUESTION_TYPES[index % 5]``."""
    return _row(split, index, QUESTION_TYPES[index % len(QUESTION_TYPES)], f"{split}-{index:05d}")


def pope_sample(split: str, index: int) -> dict[str, Any]:
    """Image ``index`` of ``split`` with its existence question (POPE style: half "yes", the "no" half split into
    adversarial / popular / random negatives, see ``subtype``), so a POPE evaluation gets one yes/no question on
    every scene of a split instead of every fifth."""
    return _row(split, index, "exist", f"{split}-pope-{index:05d}")


def build_dataset(split: str, n: int | None = None, start: int = 0) -> Any:
    """``datasets.Dataset`` of rows ``start .. start+n-1`` of ``split`` (``n`` defaults to the split's size).

    Columns: id, image (PIL), question, answer, question_type, subtype, scene (JSON list of objects).
    Save with ``ds.save_to_disk(path)``; :func:`load_split` reloads it.
    """
    import datasets

    if n is None:
        if split not in SPLIT_SIZES:
            raise ValueError(f"split {split!r} is an endless stream: pass n (how many rows)")
        n = SPLIT_SIZES[split]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "subtype": datasets.Value("string"),
            "scene": datasets.Value("string"),
        }
    )
    rows = [sample(split, i) for i in range(start, start + n)]
    return datasets.Dataset.from_list(rows, features=features)


def load_split(split: str = "test", n: int | None = None, path: str | None = None) -> Any:
    """The ``split`` as a ``datasets.Dataset``: from ``path`` (``save_to_disk`` output) when given, else generated.

    ``n`` keeps the first ``n`` rows (a fixed subset: the rows are in a fixed order).
    """
    if path is not None:
        import datasets

        ds = datasets.load_from_disk(path)
        return ds.select(range(min(n, len(ds)))) if n is not None else ds
    return build_dataset(split, n)


def vocabulary() -> list[str]:
    """Every word the questions and answers use (what a word-level tokenizer for this benchmark needs)."""
    template = "is there a an how many are shapes what colour shape the object where relative to dot ?".split()
    return sorted(set(template) | set(ANSWERS) | set(PLURAL.values()))
