"""``python -m eval report RESULTS [RESULTS ...]``: a Markdown and a CSV table, and Pareto plots (PNG), from results
files of ``python -m eval run`` (JSON lines) and of lmms-eval runs of ``--model vlmprune`` (``*_results.json``,
with the plugin's ``stats_path`` sidecar when the run wrote one), merged into one table.

Plots (one line per method and model, the unpatched model as a star): accuracy vs analytic prefill FLOPs and
accuracy vs measured TTFT when rows have accuracy; TTFT speed-up vs vision tokens kept, with the analytic FLOP
bound dashed, always (a plot with no points is not written). Files are written beside the (first) results file
(``--out-dir`` to change), named after it (``--name`` to change): ``<stem>.md``, ``<stem>.csv``,
``<stem>_acc_flops.png``, ``<stem>_acc_ttft.png``, ``<stem>_speedup.png``.
An lmms-eval row is one task of one run: its model column reads ``PATH [task]``, its accuracy is the task's first
metric, and its speed-up is against the unpatched run of the same model and task when one is given.
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
    ("vision GFLOPs", "vision_gflops"),
    ("FLOP bound", "flop_bound_speedup"),
    ("analytic/counter", "flops_analytic_over_counter"),
    ("TTFT ms (median)", "ttft_ms_median"),
    ("TTFT ms (min)", "ttft_ms_min"),
    ("vision ms", "vision_ms_median"),
    ("speed-up", "speedup_vs_unpatched"),
    ("overhead vs ideal", "overhead_ratio"),
    ("decode tok/s", "decode_tokens_per_s"),
    ("KV cache MB", "kv_mb"),
    ("peak MB", "peak_mb"),
    ("cpu/wall", "cpu_per_wall"),
]


def load(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a harness results file (JSON lines) or of an lmms-eval ``*_results.json`` (see :func:`lmms_rows`)."""
    path = Path(path)
    text = path.read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "results" in whole and "config" in whole:
        rows = lmms_rows(whole, path)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} has no rows")
    for r in rows:
        flops = r.get("flops") or {}
        r["gflops"] = flops["prefill"] / 1e9 if flops.get("prefill") is not None else None
        vis = [flops.get(k) for k in ("vision", "projector")]
        r["vision_gflops"] = sum(vis) / 1e9 if all(v is not None for v in vis) else None
        r["kv_mb"] = r["kv_cache_bytes"] / 2**20 if r.get("kv_cache_bytes") else None
        peak = r.get("peak_cuda_bytes") or r.get("peak_rss_delta_bytes")
        r["peak_mb"] = peak / 2**20 if peak else None
    return rows


def _model_args(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        k, _, v = part.partition("=")
        try:
            out[k] = int(v) if v.isdigit() else float(v)
        except ValueError:
            out[k] = v
    return out


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def lmms_rows(results: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """One row per task of an lmms-eval run of ``--model vlmprune``: the task's first metric as ``accuracy``, and
    vision tokens, TTFT and analytic FLOPs per sample from the plugin's ``stats_path`` sidecar when it is there
    (else the run's ``avg_vlmprune_*`` throughput fields, which cover all tasks of the run together). Sidecar
    records of another model or method config (a ``stats_path`` shared between runs) are left out.
    ``speedup_vs_unpatched`` / ``flop_bound_speedup`` are filled in by :func:`_relative` against the unpatched
    row of the same model and task, when the files given include one."""
    cfg = results.get("config", {})
    args = _model_args(cfg.get("model_args", ""))
    method = args.get("method")
    method = None if method in (None, "", "none", "unpatched") else str(method)
    sidecar: list[dict[str, Any]] = []
    if args.get("stats_path"):
        side = Path(str(args["stats_path"]))
        for f in [side, *sorted(side.parent.glob(f"{side.stem}.rank*{side.suffix}"))]:
            if f.is_file():
                sidecar += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    # a sidecar written by another run (a shared stats_path) does not describe this one
    model = str(args.get("pretrained", ""))
    sidecar = [
        r
        for r in sidecar
        if r.get("model") == model
        and (r.get("config") or {}).get("method") == method
        and (method is None or "keep" not in args or r["config"].get("keep") == args["keep"])
    ]
    if method is None:
        keep: Any = 1.0
    elif "keep" in args:
        keep = args["keep"]
    elif sidecar:
        keep = sidecar[0]["config"]["keep"]
    else:  # the method's default budget
        import vlmprune

        keep = vlmprune.make_config(method).keep
    thr = results.get("throughput", {})
    rows = []
    for task, metrics in results["results"].items():
        names = [k for k in metrics if "," in k and "_stderr" not in k and not k.startswith("alias")]
        if not names:
            continue
        recs = [r for r in sidecar if r.get("task") == task and "vision_tokens_at_llm" in r]
        if recs:
            tok = _median([r["vision_tokens_at_llm"] for r in recs])
            ttft = _median([r["ttft_ms"] for r in recs if r.get("ttft_ms") is not None])
            fl = [r["flops"] for r in recs if r.get("flops")]
            flops = {k: sum(f[k] for f in fl) / len(fl) for k in fl[0]} if len(fl) == len(recs) else None
        else:
            tok = thr.get("avg_vlmprune_vision_tokens_at_llm")
            ttft = thr.get("avg_vlmprune_ttft_ms_median")
            g = thr.get("avg_vlmprune_prefill_gflops")
            flops = {"prefill": g * 1e9} if g is not None else None
        rows.append(
            {
                "source": str(path),
                "model": f"{args.get('pretrained', cfg.get('model'))} [{task}]",
                "benchmark": f"lmms:{task}",
                "method": method,
                "keep": keep,
                "metric": names[0].split(",")[0],
                "accuracy": metrics[names[0]],
                "vision_tokens_at_llm": tok,
                "ttft_ms_median": ttft,
                "flops": flops,
                "n": (results.get("n-samples", {}).get(task) or {}).get("effective"),
                "machine": {
                    "lmms_eval": results.get("lmms_eval_version"),
                    "device": cfg.get("device"),
                    "date": results.get("date"),
                },
            }
        )
    return rows


def _relative(rows: list[dict[str, Any]]) -> None:
    """Speed-up and FLOP bound of lmms-eval rows against their unpatched row (same model and task)."""
    base = {r["model"]: r for r in rows if str(r.get("benchmark")).startswith("lmms:") and r["method"] is None}
    for r in rows:
        b = base.get(r["model"])
        if b is None or not str(r.get("benchmark")).startswith("lmms:"):
            continue
        if r.get("ttft_ms_median") and b.get("ttft_ms_median"):
            r["speedup_vs_unpatched"] = b["ttft_ms_median"] / r["ttft_ms_median"]
        if r.get("gflops") and b.get("gflops"):
            r["flop_bound_speedup"] = b["gflops"] / r["gflops"]


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
    m = next((r["machine"] for r in rows if "cpu" in (r.get("machine") or {})), None)
    if m is not None:
        lines += [
            "",
            f"Machine: {m.get('cpu')} ({m.get('torch_threads')} threads){', ' + m['cuda'] if m.get('cuda') else ''}; "
            f"torch {m.get('torch')}, transformers {m.get('transformers')}, vlmprune {m.get('vlmprune')}, "
            f"git {m.get('git_sha')}, {m.get('date')}.",
        ]
    lm = next((r for r in rows if str(r.get("benchmark")).startswith("lmms:")), None)
    if lm is not None:
        lines += [
            "",
            f"lmms-eval rows ({lm['machine'].get('lmms_eval')}, device {lm['machine'].get('device')}): accuracy is "
            "each task's first metric; TTFT is the plugin's per-sample time from entering generate() to the end of "
            "the first forward (median), not the harness's interleaved prefill timing.",
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
        need = {"acc_flops": ("gflops", "accuracy"), "acc_ttft": ("ttft_ms_median", "accuracy")}.get(
            kind, ("vision_tokens_at_llm", "speedup_vs_unpatched")
        )
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mi, model in enumerate(models):  # colour = method, line style and marker = model
            style = ["-o", "--s", ":^", "-.D"][mi % 4]
            mrows = [r for r in rows if r["model"] == model]
            tag = Path(model).name if len(models) > 1 else ""
            base = next((r for r in mrows if r["method"] is None), None)
            for meth in methods:
                pts = [r for r in mrows if r["method"] == meth]
                pts = [r for r in pts if all(r.get(k) is not None for k in need)]
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
                    {
                        (r["vision_tokens_at_llm"], r["flop_bound_speedup"])
                        for r in mrows
                        if r["method"] != "fastv" and r.get("flop_bound_speedup") and r.get("vision_tokens_at_llm")
                    }
                )
                if bound:
                    ax.plot(*zip(*bound, strict=True), "k--", lw=1, label=f"FLOP bound {tag}".strip())
            elif base is not None and base.get("accuracy") is not None and base.get(need[0]) is not None:
                x = base[need[0]]
                ax.plot(
                    [x],
                    [100 * base["accuracy"]],
                    "k" + ["*", "P", "X", "h"][mi % 4],
                    ms=12,
                    label=f"unpatched {tag}".strip(),
                )
        if not ax.lines:
            plt.close(fig)
            continue
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


def report(
    paths: str | Path | list[str | Path], out_dir: str | Path | None = None, name: str | None = None
) -> dict[str, Any]:
    """Table and plots of one or more results files (harness JSON lines or lmms-eval ``*_results.json``)."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise SystemExit("no results files given")
    rows = [r for p in paths for r in load(p)]
    _relative(rows)
    out = Path(out_dir) if out_dir else paths[0].parent
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (name or (paths[0].stem if len(paths) == 1 else f"{paths[0].stem}_merged"))
    md = table(rows)
    pope = pope_table(rows)
    if pope:
        md += '\n\n## POPE-style metrics (existence questions; "yes" = positive)\n\n' + pope
    title = ", ".join(p.name for p in paths)
    stem.with_suffix(".md").write_text(f"# {title}\n\n{md}\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in COLUMNS])
        for r in rows:
            w.writerow([r["method"] or "unpatched" if k == "method" else r.get(k) for _, k in COLUMNS])
    pngs = plots(rows, stem)
    return {"markdown": md, "files": [stem.with_suffix(".md"), stem.with_suffix(".csv"), *pngs], "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval report", description=__doc__.split("\n")[0])
    p.add_argument(
        "results", nargs="+", help="JSON-lines files of `python -m eval run` and/or lmms-eval *_results.json files"
    )
    p.add_argument("--out-dir", help="where to write the table and plots (default: beside the first results file)")
    p.add_argument("--name", help="file stem of the outputs (default: the first results file's stem)")
    a = p.parse_args(argv)
    res = report(a.results, a.out_dir, a.name)
    print(res["markdown"])
    print("\nwrote " + ", ".join(str(f) for f in res["files"]))
