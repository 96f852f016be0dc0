"""Lexical features: each sample's transcript -> a BERT-family model (MacBERT, RoBERTa, ...) from a local folder.

Reads the MER2023 transcription CSV (``name`` plus the language's column) and, by default, sums the last four
hidden states and mean-pools over tokens without [CLS] / [SEP], as the MER2023 baseline does. The column rules,
the baseline's source and the shapes: docs/guides/features.md ("Transcripts and text layers").
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from expmae.features.common import (
    LAYER_REDUCTIONS,
    check_layers,
    check_model_dir,
    combine_layers,
    feature_dir_name,
    list_inputs,
    model_fingerprint,
    parse_layers,
    resolve_device,
    resolve_dtype,
    run_extraction,
)
from expmae.shards import Shard
from expmae.video import VIDEO_EXTENSIONS

DEFAULT_LAYERS = (-4, -3, -2, -1)
TEXT_COLUMNS = {"zh": ("chinese", "sentence"), "en": ("english",)}
MODEL_EXAMPLE = "hfl/chinese-macbert-large"


def read_transcripts(path: str | os.PathLike, *, language: str = "zh", column: str | None = None) -> dict[str, str]:
    """``{name: text}`` from a MER2023-style transcription CSV (empty cells give "")."""
    path = Path(path)
    if language not in TEXT_COLUMNS:
        raise ValueError(f"language {language!r}; expected one of {', '.join(TEXT_COLUMNS)}")
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: files saved by Excel start with a BOM
        reader = csv.DictReader(f)
        header = {h.strip().lower(): h for h in reader.fieldnames or []}
        wanted = [column.lower()] if column else list(TEXT_COLUMNS[language])
        text_col = next((header[c] for c in wanted if c in header), None)
        if "name" not in header or text_col is None:
            need = "name and " + (" or ".join(wanted))
            raise ValueError(f"{path}: columns {list(header.values())}; expected {need} (MER2023 layout: name,chinese,english)")
        texts: dict[str, str] = {}
        for row_no, row in enumerate(reader, start=2):
            name = (row[header["name"]] or "").strip()
            if not name:
                raise ValueError(f"{path}: row {row_no} has an empty name")
            if name in texts:
                raise ValueError(f"{path}: sample {name!r} appears twice (again in row {row_no})")
            text = (row[text_col] or "").strip()
            texts[name] = "" if text == "nan" else text  # the baseline's pandas astype(str) turned missing text into "nan"
    return texts


class TextEncoder:
    """A local BERT-family folder as ``text -> (token features (T, D), info)``; see the module docstring."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        layers: str | Sequence[int] = DEFAULT_LAYERS,
        layer_reduce: str = "sum",
        device: str = "auto",
        dtype: str = "float32",
    ):
        # Check the folder before the slow imports, so a wrong path fails at once.
        self.model_dir = check_model_dir(model_dir, what="a BERT-family model", example=MODEL_EXAMPLE)
        # deferred: console start-up: torch and transformers, +1.5 s on expmae-features --help
        import torch
        from transformers import AutoModel, AutoTokenizer

        if layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduce={layer_reduce!r}; expected one of {', '.join(LAYER_REDUCTIONS)}")
        self.layers, self.layer_reduce = parse_layers(layers), layer_reduce
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        self.model.to(self.device, self.dtype).eval()
        config = self.model.config
        self.dim = int(config.hidden_size)
        check_layers(self.layers, config.num_hidden_layers + 1)
        # Tokenizers saved without a length say ~1e30; the position table is the real limit.
        self.max_tokens = min(self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512))
        self._torch = torch

    def __call__(self, text: str) -> tuple[np.ndarray, dict]:
        torch = self._torch
        text = text.strip()
        empty = (np.zeros((1, self.dim), dtype=np.float32), {"tokens": 0, "empty_text": True})
        if not text:
            return empty
        enc = self.tokenizer(text, return_special_tokens_mask=True)
        truncated = len(enc["input_ids"]) > self.max_tokens
        if truncated:
            enc = self.tokenizer(text, return_special_tokens_mask=True, truncation=True, max_length=self.max_tokens)
        keep = np.asarray(enc.pop("special_tokens_mask")) == 0
        if not keep.any():
            return empty
        inputs = {k: torch.tensor([v], device=self.device) for k, v in enc.items()}
        with torch.inference_mode():
            hidden = self.model(**inputs, output_hidden_states=True).hidden_states
            tokens = combine_layers(hidden, self.layers, self.layer_reduce)[0].float().cpu().numpy()
        info = {"tokens": int(keep.sum())}
        if truncated:
            info["truncated"] = True
        return tokens[keep], info


def extract_text_features(
    transcripts: str | os.PathLike | Mapping[str, str],
    out_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    language: str = "zh",
    column: str | None = None,
    layers: str | Sequence[int] = DEFAULT_LAYERS,
    layer_reduce: str = "sum",
    pooling: str = "mean",
    device: str = "auto",
    dtype: str = "float32",
    limit: int | None = None,
    retry_failed: bool = False,
    shard: Shard = Shard(),
    progress: bool = True,
):
    """One ``<name>.npy`` per sample in ``names`` (default: every row of the CSV). A name without a row in
    the transcripts is recorded in failures.jsonl and the rest go on. Returns the job's JobSummary."""
    source = "transcripts"
    if not isinstance(transcripts, Mapping):
        source = Path(transcripts).name
        transcripts = read_transcripts(transcripts, language=language, column=column)
    names = list(transcripts) if names is None else [str(n) for n in names]
    encoder = TextEncoder(model_dir, layers=layers, layer_reduce=layer_reduce, device=device, dtype=dtype)

    def load(name: str) -> str:
        if name not in transcripts:
            raise LookupError(f"{name}: no row for this sample in {source}")
        return transcripts[name]

    settings = {"modality": "text", "model": encoder.model_dir.name, "model_config": model_fingerprint(encoder.model_dir),
                "layers": list(encoder.layers), "layer_reduce": layer_reduce, "language": language,
                "column": column, "dtype": dtype}
    return run_extraction(names, out_dir, load=load, encode=encoder, pooling=pooling, settings=settings, key=str,
                          limit=limit, retry_failed=retry_failed, shard=shard, prefetch=0, desc="text features", progress=progress)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transcripts", type=Path, default=None,
                        help="MER2023 transcription CSV (name,chinese,english); default: INPUT when it is a .csv")
    parser.add_argument("--language", choices=sorted(TEXT_COLUMNS), default="zh", help="which transcript column to embed")
    parser.add_argument("--text-column", default=None, help="use this CSV column instead of the language's default")
    parser.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)),
                        help="hidden states to combine (MER2023 baseline: -4,-3,-2,-1, the default)")
    parser.add_argument("--layer-reduce", choices=LAYER_REDUCTIONS, default="sum", help="how to combine several layers")


def run_cli(args: argparse.Namespace, out_root: Path):
    source = Path(args.input)
    if source.suffix.lower() == ".csv" and args.transcripts is None:
        transcripts, names = source, None  # every row of the CSV
    elif args.transcripts is None:
        raise ValueError(f"{source}: give the transcript CSV with --transcripts (INPUT names the samples: videos or a .txt list)")
    else:
        # Samples are named by their file stems; a .txt list may also hold bare names (which may contain dots).
        transcripts = args.transcripts
        names = [p.stem if p.suffix.lower() in (*VIDEO_EXTENSIONS, ".npy") else p.name for p in list_inputs(source)]
    out_dir = out_root / (args.name or feature_dir_name(args.model, args.pooling, parse_layers(args.layers)))
    summary = extract_text_features(transcripts, out_dir, args.model, names=names, language=args.language,
                                    column=args.text_column, layers=args.layers, layer_reduce=args.layer_reduce,
                                    pooling=args.pooling, device=args.device, dtype=args.dtype, limit=args.limit,
                                    retry_failed=args.retry_failed, shard=args.shard, progress=not args.no_progress)
    return out_dir, summary
