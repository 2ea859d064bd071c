"""``python -m eval report RESULTS.jsonl``: a Markdown and a CSV table, and Pareto plots (PNG), from any results
file of ``python -m eval run``.

Plots (one line per method and model, the unpatched model as a star): accuracy vs analytic prefill FLOPs and
accuracy vs measured TTFT when rows have accuracy; TTFT speed-up vs vision tokens kept, with the analytic FLOP
bound dashed, always. Files are written beside the results (``--out-dir`` to change): ``<stem>.md``,
``<stem>.csv``, ``<stem>_acc_flops.png``, ``<stem>_acc_ttft.png``, ``<stem>_speedup.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = [
    ("model", "model"),
    ("method", "method"),
    ("keep", "keep"),
    ("vision tok", "vision_tokens_at_llm"),
    ("accuracy %", "accuracy"),
    ("prefill GFLOPs", "gflops"),
    ("FLOP bound", "flop_bound_speedup"),
    ("analytic/counter", "flops_analytic_over_counter"),
    ("TTFT ms (median)", "ttft_ms_median"),
    ("TTFT ms (min)", "ttft_ms_min"),
    ("speed-up", "speedup_vs_unpatched"),
    ("overhead vs ideal", "overhead_ratio"),
    ("decode tok/s", "decode_tokens_per_s"),
    ("KV cache MB", "kv_mb"),
    ("cpu/wall", "cpu_per_wall"),
]


def load(path: str | Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} has no rows")
    for r in rows:
        r["gflops"] = r["flops"]["prefill"] / 1e9
        r["kv_mb"] = r["kv_cache_bytes"] / 2**20 if r.get("kv_cache_bytes") else None
    return rows


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if key == "accuracy":
        return f"{100 * v:.1f}"
    if key in ("flop_bound_speedup", "speedup_vs_unpatched"):
        return f"{v:.2f}×"
    if key in ("overhead_ratio", "flops_analytic_over_counter", "cpu_per_wall"):
        return f"{v:.3f}"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        method = r["method"] or "unpatched"
        cells = [_fmt(k, method if k == "method" else r.get(k)) for _, k in COLUMNS]
        if r.get("contended"):
            cells[COLUMNS.index(("cpu/wall", "cpu_per_wall"))] += " (contended)"
        lines.append("| " + " | ".join(cells) + " |")
    m = rows[0]["machine"]
    lines += [
        "",
        f"Machine: {m.get('cpu')} ({m.get('torch_threads')} threads){', ' + m['cuda'] if m.get('cuda') else ''}; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, vlmprune {m.get('vlmprune')}, "
        f"git {m.get('git_sha')}, {m.get('date')}.",
    ]
    return "\n".join(lines)


POPE_COLUMNS = [
    ("model", "model"),
    ("method", "method"),
    ("keep", "keep"),
    ("POPE acc %", "accuracy"),
    ("precision %", "precision"),
    ("recall %", "recall"),
    ("F1 %", "f1"),
    ("yes %", "yes_ratio"),
    ("adversarial acc %", "adversarial"),
    ("popular acc %", "popular"),
    ("random acc %", "random"),
    ("n", "n"),
    ("prefill GFLOPs", "gflops"),
    ("decode GFLOPs/token", "decode_gflops"),
    ("TTFT ms (median)", "ttft_ms_median"),
    ("decode tok/s", "decode_tokens_per_s"),
]


def pope_table(rows: list[dict[str, Any]]) -> str | None:
    """POPE metrics of the rows' existence questions (``None`` when no row has them), with the cost beside."""
    rows = [r for r in rows if r.get("pope")]
    if not rows:
        return None
    pct = {"accuracy", "precision", "recall", "f1", "yes_ratio", "adversarial", "popular", "random"}
    lines = ["| " + " | ".join(c for c, _ in POPE_COLUMNS) + " |", "|" + "---|" * len(POPE_COLUMNS)]
    for r in rows:
        p = dict(r["pope"])
        for sub, m in p.pop("per_subtype", {}).items():
            p[sub] = m["accuracy"]
        cells = []
        for _, k in POPE_COLUMNS:
            if k == "method":
                v = r["method"] or "unpatched"
            elif k in ("model", "keep", "gflops", "ttft_ms_median", "decode_tokens_per_s"):
                v = r.get(k)
            elif k == "decode_gflops":
                v = r["flops"]["decode_per_token"] / 1e9
            else:
                v = p.get(k)
            cells.append("—" if v is None else f"{100 * v:.1f}" if k in pct else _fmt(k, v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    models = sorted({r["model"] for r in rows})
    methods = sorted({r["method"] for r in rows if r["method"]})
    have_acc = any(r.get("accuracy") is not None for r in rows)
    specs = [("speedup", "vision tokens at the LLM (per image)", "TTFT speed-up vs unpatched")]
    if have_acc:
        specs = [
            ("acc_flops", "prefill GFLOPs (analytic)", "accuracy (%)"),
            ("acc_ttft", "TTFT, median (ms)", "accuracy (%)"),
        ] + specs
    for kind, xl, yl in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mi, model in enumerate(models):  # colour = method, line style and marker = model
            style = ["-o", "--s", ":^", "-.D"][mi % 4]
            mrows = [r for r in rows if r["model"] == model]
            tag = Path(model).name if len(models) > 1 else ""
            base = next((r for r in mrows if r["method"] is None), None)
            for meth in methods:
                pts = [r for r in mrows if r["method"] == meth]
                if kind != "speedup":
                    pts = [r for r in pts if r.get("accuracy") is not None]
                if not pts:
                    continue
                if kind == "acc_flops":
                    xy = sorted((r["gflops"], 100 * r["accuracy"]) for r in pts)
                elif kind == "acc_ttft":
                    xy = sorted((r["ttft_ms_median"], 100 * r["accuracy"]) for r in pts)
                else:
                    xy = sorted((r["vision_tokens_at_llm"], r["speedup_vs_unpatched"]) for r in pts)
                color = f"C{methods.index(meth) % 10}"
                ax.plot(*zip(*xy, strict=True), style, color=color, label=f"{meth} {tag}".strip())
            if kind == "speedup":
                bound = sorted(
                    {(r["vision_tokens_at_llm"], r["flop_bound_speedup"]) for r in mrows if r["method"] != "fastv"}
                )
                ax.plot(*zip(*bound, strict=True), "k--", lw=1, label=f"FLOP bound {tag}".strip())
            elif base is not None and base.get("accuracy") is not None:
                x = base["gflops"] if kind == "acc_flops" else base["ttft_ms_median"]
                ax.plot(
                    [x],
                    [100 * base["accuracy"]],
                    "k" + ["*", "P", "X", "h"][mi % 4],
                    ms=12,
                    label=f"unpatched {tag}".strip(),
                )
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"vlmprune: {yl} vs {xl.split(' (')[0]}")
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    rows = load(path)
    path = Path(path)
    out = Path(out_dir) if out_dir else path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = out / path.stem
    md = table(rows)
    pope = pope_table(rows)
    if pope:
        md += '\n\n## POPE-style metrics (existence questions; "yes" = positive)\n\n' + pope
    stem.with_suffix(".md").write_text(f"# {path.name}\n\n{md}\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in COLUMNS])
        for r in rows:
            w.writerow([r["method"] or "unpatched" if k == "method" else r.get(k) for _, k in COLUMNS])
    pngs = plots(rows, stem)
    return {"markdown": md, "files": [stem.with_suffix(".md"), stem.with_suffix(".csv"), *pngs]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval report", description=__doc__.split("\n")[0])
    p.add_argument("results", help="a JSON-lines file written by `python -m eval run`")
    p.add_argument("--out-dir", help="where to write the table and plots (default: beside the results)")
    a = p.parse_args(argv)
    res = report(a.results, a.out_dir)
    print(res["markdown"])
    print("\nwrote " + ", ".join(str(f) for f in res["files"]))
