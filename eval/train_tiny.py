"""Train the shipped tiny VLMs from scratch, on CPU (or a GPU when there is one), fully offline.

    python -m eval train --family llava --data shapes --out checkpoints/shapes-llava-tiny
    python -m eval train --family qwen2_vl --data shapes --out checkpoints/shapes-qwen2vl-tiny
    python -m eval train --family llava --data easyvqa --out checkpoints/easyvqa-llava-tiny

Recipe (the model cards quote the exact arguments, time and scores):

* every training image carries several questions, asked as consecutive chat turns
  (``USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...``) so the vision tower runs once for
  several supervised answers; the loss is on the answer words and their ``</s>`` only;
* an auxiliary, CLIP-like *image-level* objective: a linear head on the vision tower's pooled output (CLIP's CLS
  after ``post_layernorm``; Qwen2-VL has no CLS, so the mean of the merged tokens) predicts which
  (colour, shape) pairs and which dot colour the image contains (multi-label BCE). It is image-level, like a
  caption, never per patch, so nothing tells the tower *where* objects are; the head is dropped on save;
* AdamW, linear warm-up then cosine decay, gradient clipping at 1, bf16 autocast by default (``--dtype``; fast
  on CPUs with AMX / AVX-512 BF16 and on GPUs), fp16 checkpoint on save (``--save-dtype``); ``--init`` continues
  from a saved checkpoint of the same recipe (its ``training.json`` totals are carried over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from .tiny_vlm import build_model, build_processor, build_tokenizer, legacy_vision_keys, save_processor

# ShapesVQA: 128 px / patch 8 -> 16x16 patches; LLaVA feeds all 256 to the LLM (+ CLS in the tower, dropped by
# "default" select), Qwen2-VL merges 2x2 -> 64 tokens and adds M-RoPE in the LLM. Same widths for both.
_SHAPES_ARCH = dict(
    image_size=128, patch_size=8, vit_hidden=128, vit_layers=4, vit_heads=4, llm_hidden=128, llm_layers=4, llm_heads=4
)
ARCH = {
    ("llava", "shapes"): _SHAPES_ARCH,
    ("qwen2_vl", "shapes"): _SHAPES_ARCH,
    # easy-VQA's images are 64 px: patch 4 keeps 256 vision tokens
    ("llava", "easyvqa"): dict(
        image_size=64,
        patch_size=4,
        vit_hidden=96,
        vit_layers=4,
        vit_heads=4,
        llm_hidden=96,
        llm_layers=3,
        llm_heads=4,
    ),
}


# --------------------------------------------------------------------------------------------------- data
class ShapesSource:
    """Endless ShapesVQA training stream: image ``i`` with one question of every type."""

    name = "shapes"

    def __init__(self, seed: int) -> None:
        from vlmprune.benchmarks import shapes

        self.shapes = shapes
        self.combos = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
        self.n_aux = len(self.combos) + len(shapes.COLOURS)
        self.offset = seed * 10_000_000

    def words(self) -> list[str]:
        return self.shapes.vocabulary()

    def item(self, i: int) -> tuple[Any, list[tuple[str, str]], torch.Tensor]:
        img, sc, qs = self.shapes.scene_questions("train", self.offset + i)
        aux = torch.zeros(self.n_aux)
        for o in sc.shapes:
            aux[self.combos.index((o.colour, o.shape))] = 1
        aux[len(self.combos) + list(self.shapes.COLOURS).index(sc.dot.colour)] = 1
        qa = [(q["question"], q["answer"]) for q in qs]
        random.Random(self.offset + i).shuffle(qa)  # no type may own a turn position (evaluation asks in turn 1)
        return img, qa, aux

    def val_rows(self, n: int) -> list[dict]:
        return [self.shapes.sample("val", i) for i in range(n)]


class EasyVQASource:
    """easy-VQA's training split (4,000 images, ~9.6 questions each), shuffled per epoch."""

    name = "easyvqa"

    def __init__(self, seed: int) -> None:
        from vlmprune.benchmarks import easyvqa

        self.ev = easyvqa
        self.images, self.questions = easyvqa.grouped("train")
        self.order = list(range(len(self.images)))
        self.rng = random.Random(seed)
        self.n_aux = 0

    def words(self) -> list[str]:
        return self.ev.vocabulary()

    def item(self, i: int) -> tuple[Any, list[tuple[str, str]], None]:
        epoch, j = divmod(i, len(self.order))
        if j == 0:
            self.rng.shuffle(self.order)
        k = self.order[j]
        qs = list(self.questions[k])
        random.Random(i).shuffle(qs)
        return self.ev.load_image(self.images[k]), qs[:6], None

    def val_rows(self, n: int) -> list[dict]:
        return self.ev.rows("val", n)


def _split_words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text)


# --------------------------------------------------------------------------------------------------- batches
def make_batch(family: str, processor: Any, items: list) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Multi-turn training sequences, right-padded; labels = answer words and their ``</s>``, else -100."""
    tok = processor.tokenizer
    place = "<image>\n" if family == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    texts = []
    for _, qa, _ in items:
        turns = [f"USER: {place if t == 0 else ''}{q} ASSISTANT: {a}</s>" for t, (q, a) in enumerate(qa)]
        texts.append("".join(turns))
    side, tok.padding_side = tok.padding_side, "right"
    try:
        batch = processor(images=[it[0] for it in items], text=texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    ids = batch["input_ids"]
    asst, colon, eos = tok.convert_tokens_to_ids(["ASSISTANT", ":", "</s>"])
    labels = torch.full_like(ids, -100)
    start = (ids[:, :-2] == asst) & (ids[:, 1:-1] == colon)  # answer begins two tokens after ASSISTANT
    pos = torch.zeros_like(ids, dtype=torch.bool)
    pos[:, 2:] = start
    # an answer runs from there to its </s> (inclusive)
    inside = torch.zeros_like(ids[:, 0], dtype=torch.bool)
    for t in range(ids.shape[1]):
        inside = inside | pos[:, t]
        labels[:, t] = torch.where(inside, ids[:, t], labels[:, t])
        inside = inside & (ids[:, t] != eos)
    batch["labels"] = labels
    aux = torch.stack([it[2] for it in items]) if items[0][2] is not None else None
    return batch, aux


# --------------------------------------------------------------------------------------------------- eval
@torch.inference_mode()
def quick_accuracy(model: torch.nn.Module, processor: Any, rows: list[dict], batch_size: int = 32) -> dict:
    """Accuracy of the first answer token from one prefill (what greedy ``generate`` would emit first)."""
    from vlmprune.benchmarks import first_word, prompt_inputs, score

    model.eval()
    preds = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        inputs = prompt_inputs(processor, chunk).to(next(model.parameters()).device)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        preds += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    model.train()
    res = score([first_word(p) for p in preds], rows)
    res.pop("correct")
    return res


# --------------------------------------------------------------------------------------------------- train
def _aux_features(model: torch.nn.Module, family: str, store: dict) -> Any:
    """Hook capturing the pooled vision output the auxiliary head reads."""
    if family == "llava":
        tower = model.model.vision_tower
        mod = getattr(tower, "vision_model", tower).post_layernorm  # transformers < ~5.2 nests a vision_model

        def hook(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            store["pooled"] = out[:, 0] if out.ndim == 3 else out  # (B, D): CLIP's pooled CLS

    else:
        mod = model.model.visual.merger

        def hook(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            store["merged"] = out  # (sum of tokens, D): merged tokens of every image, in order

    return mod.register_forward_hook(hook)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    source = ShapesSource(args.seed) if args.data == "shapes" else EasyVQASource(args.seed)
    arch = dict(ARCH[(args.family, args.data)])
    for kv in args.arch or []:
        k, _, v = kv.partition("=")
        arch[k] = int(v)
    words = source.words()
    tok = build_tokenizer(args.family, words)
    processor = build_processor(args.family, tok, arch["image_size"], arch["patch_size"])
    model = build_model(args.family, tok, arch, seed=args.seed)
    if args.init:  # continue from a checkpoint of the same recipe (a fresh schedule and auxiliary head)
        init = type(model).from_pretrained(args.init, dtype=torch.float32)
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(args.init).get_vocab() != tok.get_vocab():
            raise SystemExit(f"--init {args.init}: its vocabulary differs from this recipe's; retrain from scratch")
        try:
            model.load_state_dict(init.state_dict())  # strict: any shape difference is an error
        except RuntimeError as e:
            raise SystemExit(f"--init {args.init} does not match this recipe's architecture: {e}") from e
        del init
    model.train()
    store: dict[str, torch.Tensor] = {}
    handle = _aux_features(model, args.family, store)
    aux_dim = arch["vit_hidden"] if args.family == "llava" else arch["llm_hidden"]
    aux_head = torch.nn.Linear(aux_dim, source.n_aux) if source.n_aux else None
    params = list(model.parameters()) + (list(aux_head.parameters()) if aux_head is not None else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.family}/{args.data}: {n_params / 1e6:.2f} M parameters, vocab {len(tok)}, arch {arch}", flush=True)
    val_rows = source.val_rows(args.val_n)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if aux_head is not None:
        aux_head.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    log = []
    t0 = time.time()
    seen = 0
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if step >= args.warmup:
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))
        for g in opt.param_groups:
            g["lr"] = lr
        items = [source.item(seen + j) for j in range(args.batch)]
        seen += args.batch
        batch, aux = make_batch(args.family, processor, items)
        batch = batch.to(device)
        aux = aux.to(device) if aux is not None else None
        with autocast:
            out = model(**batch)
            loss = out.loss
            aux_loss = torch.zeros((), device=device)
            if aux_head is not None and aux is not None:
                if args.family == "llava":
                    pooled = store["pooled"]
                else:
                    n = store["merged"].shape[0] // len(items)
                    pooled = store["merged"].reshape(len(items), n, -1).mean(1)
                aux_loss = torch.nn.functional.binary_cross_entropy_with_logits(aux_head(pooled.float()), aux)
                loss = loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t0
            print(
                f"step {step + 1}/{args.steps} loss {out.loss.item():.3f} aux {aux_loss.item():.3f} lr {lr:.2e} "
                f"{el / 60:.1f} min ({seen / el:.1f} img/s)",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            res = quick_accuracy(model, processor, val_rows)
            el = time.time() - t0
            log.append({"step": step + 1, "minutes": el / 60, "val": res})
            print(f"  val@{step + 1}: {res['accuracy']:.3f} {json.dumps(res['per_type'])}", flush=True)
    handle.remove()
    minutes = (time.time() - t0) / 60
    model.eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.save_dtype]
    model.to("cpu", save_dtype).save_pretrained(out_dir)
    if args.family == "llava":
        legacy_vision_keys(out_dir)
    save_processor(processor, out_dir)
    prev = {}
    if args.init and (Path(args.init) / "training.json").is_file():
        prev = json.loads((Path(args.init) / "training.json").read_text())
    info = {
        "family": args.family,
        "data": args.data,
        "arch": arch,
        "parameters": n_params,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "train_minutes": round(minutes + prev.get("train_minutes", 0), 1),
        "images_seen": seen + prev.get("images_seen", 0),
        "legs": prev.get("legs", [prev["args"]] if prev else []) + [dict(vars(args))],
        "init": args.init,
        "threads": args.threads,
        "device": str(device) + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "val_log": log,
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {out_dir} after {minutes:.1f} min", flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval train", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["llava", "qwen2_vl"], required=True)
    p.add_argument("--data", choices=["shapes", "easyvqa"], default="shapes")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16, help="images per step (each with several questions)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the image-level auxiliary loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="autocast dtype for training")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--val-n", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--arch", nargs="*", help="override ARCH entries, e.g. vit_layers=4")
    p.add_argument("--init", help="start from this checkpoint's weights (same recipe) instead of random ones")
    train(p.parse_args(argv))
