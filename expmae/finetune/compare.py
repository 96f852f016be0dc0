"""``--compare``: several heads on the same folds, one table (markdown + JSON), shaped like the paper's Table 3.

Each head spec (``svm``, ``transformer:3``, ``transformer:6``, ``attention``, ``mfb``, ``concat``) runs the whole
protocol into ``out_dir/<spec>/`` with every other setting equal, so the folds (stratified with one seed, or the
set's own split) and the inputs are the same for every row. The table has a row per head: the fold-mean CV scores
(the selected metric first) and, per labelled test set, its scores. A head without a regression output (svm)
shows n/a for the regression terms (MER2023: metric_v and metric; its score there is metric_e).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from expmae.finetune.common import fmt, log
from expmae.finetune.config import FinetuneConfig
from expmae.finetune.heads import parse_head_spec
from expmae.finetune.metrics import Scorer
from expmae.files import write_json
from expmae.finetune.protocol import run_finetune

TABLE_JSON, TABLE_MD = "compare.json", "compare.md"


def head_configs(cfg: FinetuneConfig) -> list[tuple[str, FinetuneConfig]]:
    """(spec, the run's config) per head spec of ``cfg.compare``."""
    specs = [s.strip() for s in cfg.compare.split(",") if s.strip()]
    if not specs or len(set(specs)) != len(specs):
        raise ValueError(f"compare={cfg.compare!r}: expected distinct comma-separated head specs, e.g. "
                         "svm,transformer:3,transformer:6,attention,mfb")
    runs = []
    for spec in specs:
        name, layers = parse_head_spec(spec)
        out_dir = Path(cfg.out_dir) / re.sub(r"[^A-Za-z0-9_.-]", "-", spec)
        runs.append((spec, dataclasses.replace(cfg, head=name, head_layers=layers or cfg.head_layers, compare="",
                                               out_dir=str(out_dir))))
    return runs


def run_compare(cfg: FinetuneConfig) -> dict:
    """Run every head of ``cfg.compare``; write and return the table."""
    runs = head_configs(cfg)  # every spec checked before the first run starts
    rows, columns, tests = [], None, None
    for spec, run_cfg in runs:
        log(f"[compare] {spec} -> {run_cfg.out_dir}")
        results = run_finetune(run_cfg)
        if columns is None:
            columns = headline(results)
            tests = [name for name, t in results["tests"].items() if "metrics" in t]
        rows.append({"head": spec, "cv": {m: results["cv"].get(m) for m in columns},
                     "tests": {t: {m: results["tests"][t]["metrics"].get(m) for m in columns} for t in tests},
                     "results_json": str(Path(run_cfg.out_dir) / "results.json")})
    table = {"metric": columns[0], "columns": columns, "tests": tests, "folds": len(results["folds"]),
             "dataset": results["dataset"], "rows": rows}
    out_dir = Path(cfg.out_dir)
    write_json(out_dir / TABLE_JSON, table)
    markdown = to_markdown(table)
    (out_dir / TABLE_MD).write_text(markdown, encoding="utf-8")
    print(markdown, end="")
    return table


def headline(results: dict) -> list[str]:
    """The selected metric, then the set's summary metrics (those the protocol prints)."""
    scorer = Scorer(results["classes"], results["targets"], mer=results["dataset"] == "mer2023", metric=results["metric"])
    return scorer.headline()


def to_markdown(table: dict) -> str:
    """One row per head: CV columns, then each labelled test set's."""
    cols = [f"CV {m}" for m in table["columns"]] + [f"{t} {m}" for t in table["tests"] for m in table["columns"]]
    lines = [f"| head | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 1)]
    for row in table["rows"]:
        values = [row["cv"][m] for m in table["columns"]] + [row["tests"][t][m] for t in table["tests"] for m in table["columns"]]
        lines.append(f"| {row['head']} | {' | '.join(fmt(v) for v in values)} |")
    return "\n".join(lines) + "\n"
