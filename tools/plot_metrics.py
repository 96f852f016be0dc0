"""Plot a pretraining run's metrics.jsonl (the same numbers TensorBoard shows) into one PNG, to compare a run with
the healthy one in docs/guides/pretraining.md:

    python tools/plot_metrics.py RUN_DIR --out run.png [--max-step N]

Panels: total and per-branch loss, lr, grad norm, and the online evaluation's headline probes (eval/*knn_acc,
eval/*probe_acc) when the run had an ``eval:`` section.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: Path, max_step: int | None) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; expected a pretraining run folder (train.output_dir)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if max_step is None or r.get("step", 0) <= max_step]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a pretraining run folder (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--max-step", type=int, default=None, help="plot steps up to this one")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(args.run_dir, args.max_step)
    evals = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith(("knn_acc", "probe_acc"))
                    and k.count("/") <= 2})
    panels = [("loss", ["loss", "loss_mae", "loss_video"]), ("lr", ["lr"]), ("grad norm", ["grad_norm"])]
    if evals:
        panels.append(("online evaluation (held-out accuracy)", evals))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, label=key, marker="o" if key.startswith("eval/") else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
