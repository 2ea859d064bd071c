"""The offline benchmarks: ShapesVQA's generator and easy-VQA's loader, and the shared scoring."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

pytest.importorskip("PIL")
from vlmprune.benchmarks import first_word, paired_difference, pope_answer, pope_metrics, score, shapes  # noqa: E402


def _digest(img) -> str:
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


def test_generator_is_deterministic_and_index_addressable():
    a = [shapes.sample("test", i) for i in range(6)]
    b = [shapes.sample("test", i) for i in (5, 3, 1, 0, 2, 4)]  # any order, any subset: same rows
    b = {r["id"]: r for r in b}
    for r in a:
        s = b[r["id"]]
        assert _digest(r["image"]) == _digest(s["image"])
        assert (r["question"], r["answer"], r["scene"]) == (s["question"], s["answer"], s["scene"])


def test_splits_are_disjoint():
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for i in range(60):
            key = shapes.sample(split, i)["scene"]  # the object layout (pixels always differ by their noise)
            assert key not in seen, f"{split}-{i} repeats {seen.get(key)}"
            seen[key] = f"{split}-{i}"
    with pytest.raises(ValueError, match="unknown split"):
        shapes.sample("dev", 0)


def test_scenes_are_pinned():
    """The benchmark must not drift silently (a numpy release changing its streams would change every split)."""
    h = hashlib.sha256()
    for i in range(5):
        r = shapes.sample("test", i)
        h.update((r["scene"] + r["question"] + r["answer"]).encode())
    assert h.hexdigest() == "9884a09747ae79e417284237415baec84fc2ad971e7f0f6235c2a0dc58a13200", (
        f"ShapesVQA's test split changed (numpy {np.__version__}): scores are no longer comparable"
    )


def _relation(a: dict, b: dict) -> str:
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


@pytest.mark.parametrize("split", ["val", "test"])
def test_answers_follow_from_the_scene(split):
    """Re-derive every answer from the recorded scene with independent code."""
    numbers = ["zero", "one", "two", "three", "four"]
    types = set()
    for i in range(150):
        r = shapes.sample(split, i)
        objs = json.loads(r["scene"])
        sh = [o for o in objs if o["kind"] == "shape"]
        q, a, t = r["question"], r["answer"], r["question_type"]
        types.add(t)
        assert t == shapes.QUESTION_TYPES[i % 5]
        assert 2 <= len(sh) <= 4 and sum(o["kind"] == "dot" for o in objs) == 1
        assert len({(o["colour"], o["shape"]) for o in sh}) == len(sh)
        if t == "exist":
            c, s = re.fullmatch(r"is there an? (\w+) (\w+)\?", q).groups()
            assert a == ("yes" if any(o["colour"] == c and o["shape"] == s for o in sh) else "no")
        elif t == "count":
            m = re.fullmatch(r"how many (\w+) (?:shapes )?are there\?", q).group(1)
            n = sum(o["colour"] == m or shapes.PLURAL[o["shape"]] == m for o in sh)
            assert a == numbers[n]
        elif t == "attribute":
            if q.startswith("what shape"):
                c = re.fullmatch(r"what shape is the (\w+) object\?", q).group(1)
                (o,) = [o for o in sh if o["colour"] == c]
                assert a == o["shape"]
            else:
                s = re.fullmatch(r"what colour is the (\w+)\?", q).group(1)
                (o,) = [o for o in sh if o["shape"] == s]
                assert a == o["colour"]
        elif t == "spatial":
            c1, s1, c2, s2 = re.fullmatch(r"where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q).groups()
            (o1,) = [o for o in sh if (o["colour"], o["shape"]) == (c1, s1)]
            (o2,) = [o for o in sh if (o["colour"], o["shape"]) == (c2, s2)]
            assert a == _relation(o1, o2)
        else:
            assert q == "what colour is the dot?" and a == next(o["colour"] for o in objs if o["kind"] == "dot")
    assert types == set(shapes.QUESTION_TYPES)


def test_answers_are_balanced_enough_to_need_the_image():
    rows = [shapes.sample("test", i) for i in range(400)]
    for t in shapes.QUESTION_TYPES:
        answers = [r["answer"] for r in rows if r["question_type"] == t]
        top = max(answers.count(a) for a in set(answers)) / len(answers)
        assert top < 0.62, (t, top)  # no type is answered by its majority answer
    exist = [r for r in rows if r["question_type"] == "exist"]
    assert {r["subtype"] for r in exist} >= {"positive", "adversarial"}


def test_vocabulary_covers_every_question():
    vocab = set(shapes.vocabulary())
    for i in range(200):
        for q in shapes.scene_questions("train", i)[2]:
            words = re.findall(r"\w+|[^\w\s]", q["question"]) + [q["answer"]]
            assert set(words) <= vocab, set(words) - vocab


def test_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = shapes.build_dataset("val", n=8)
    assert len(ds) == 8 and set(ds.column_names) >= {"image", "question", "answer", "question_type"}
    ds.save_to_disk(str(tmp_path / "val"))
    back = shapes.load_split("val", n=5, path=str(tmp_path / "val"))
    assert isinstance(back, datasets.Dataset) and len(back) == 5
    for i in range(5):
        assert back[i]["question"] == ds[i]["question"]
        assert _digest(back[i]["image"].convert("RGB")) == _digest(shapes.sample("val", i)["image"])
    with pytest.raises(ValueError, match="endless"):
        shapes.build_dataset("train")


def test_easyvqa_rows():
    pytest.importorskip("easy_vqa")
    from vlmprune.benchmarks import easyvqa

    rows = easyvqa.rows("test", 30)
    assert len(rows) == 30 and {r["question_type"] for r in rows} <= set(easyvqa.QUESTION_TYPES)
    assert rows[0]["image"].size == (64, 64)
    paths_train, _ = easyvqa.grouped("train")
    paths_val, _ = easyvqa.grouped("val")
    assert not set(paths_train) & set(paths_val) and len(paths_val) == 500
    vocab = set(easyvqa.vocabulary())
    assert all(set(re.findall(r"\w+|[^\w\s]", r["question"])) <= vocab for r in rows)


def test_scoring():
    rows = [{"answer": "red", "question_type": "a"}, {"answer": "two", "question_type": "b"}]
    res = score([" Red, surely", "three"], rows)
    assert res["correct"] == [1, 0] and res["per_type"] == {"a": 1.0, "b": 0.0}
    assert first_word("  ...Yes.") == "yes" and first_word("") == ""
    with pytest.raises(ValueError):
        score(["x"], rows)
    d = paired_difference([1, 1, 1, 0] * 25, [1, 0, 1, 0] * 25)
    assert d["diff"] == pytest.approx(0.25) and d["low"] < 0.25 < d["high"]
    same = paired_difference([1, 0] * 10, [1, 0] * 10)
    assert same["low"] == same["high"] == 0


def test_pope_metrics_and_rows():
    rows = [
        {"answer": "yes", "question_type": "exist", "subtype": "positive"},
        {"answer": "yes", "question_type": "exist", "subtype": "positive"},
        {"answer": "no", "question_type": "exist", "subtype": "adversarial"},
        {"answer": "no", "question_type": "exist", "subtype": "random"},
        {"answer": "no", "question_type": "exist", "subtype": "random"},
        {"answer": "red", "question_type": "attribute", "subtype": "colour"},
    ]
    # POPE's reading: "no"/"not" in the first sentence -> no, anything else (even "maybe") -> yes
    assert [pope_answer(t) for t in ("No, there is not.", "There is not one", "Yes. No.", "maybe", "no")] == [
        "no",
        "no",
        "yes",
        "yes",
        "no",
    ]
    p = pope_metrics(["yes", "no", "Yes.", "no", "maybe", "yes"], rows)
    # tp=1 fn=1 fp=2 (the unanswered negative reads as "yes"), tn=1; the attribute row is ignored
    assert p["n"] == 5 and p["unanswered"] == 1
    assert p["precision"] == 1 / 3 and p["recall"] == 0.5 and p["f1"] == pytest.approx(0.4)
    assert p["accuracy"] == 2 / 5 and p["yes_ratio"] == 3 / 5
    assert p["per_subtype"]["adversarial"]["n"] == 3 and p["per_subtype"]["adversarial"]["accuracy"] == 1 / 3
    assert p["per_subtype"]["random"]["accuracy"] == 2 / 4
    assert pope_metrics(["red"], rows[5:]) is None
    assert score(["yes"] * 6, rows)["pope"]["recall"] == 1.0
    for i in (0, 7):  # one existence question per scene, on the same image as the benchmark row
        pr, row = shapes.pope_sample("test", i), shapes.sample("test", i)
        assert pr["question_type"] == "exist" and pr["answer"] in ("yes", "no")
        assert np.array_equal(np.asarray(pr["image"]), np.asarray(row["image"]))
