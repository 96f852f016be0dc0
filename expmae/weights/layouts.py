"""What every layout converter shares (the Collector, the report) and :func:`fit`, which fits converted weights
to a model (convert.py detects the layout and dispatches to its converter).

Each converter (mae.py, videomae.py, hf_import.py, convert.convert_expmae) renames a checkpoint's tensors to expMAE model keys (``encoder.*``,
``mae_decoder.*`` = the MAE frame decoder, ``video_decoder.*`` = the VideoMAE clip decoder) through a
:class:`Collector`, which also fuses split attention projections and folds layer scale. :func:`fit` then checks
the result against the target model: the encoder strictly (one-line errors naming the key and both shapes), the
position code against ``cfg.position_code`` and the class token against ``cfg.class_token`` (a mismatch of either is
a one-line error naming the option to set, never a silent drop), each decoder loaded only when all its shapes match.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from expmae.checkpoint import describe_config
from expmae.model import ExpMAE, ExpMAEConfig, ExpMAEEncoder, unwrap_model

POSITION_CODE_HELP = {"separable": "the 2-D + temporal sin-cos code", "videomae": "VideoMAE's 1-D sin-cos table"}
PARTS = ("encoder", "mae_decoder", "video_decoder")
_PART_NAMES = {"mae_decoder": "MAE frame decoder", "video_decoder": "VideoMAE clip decoder"}
_BLOCK = re.compile(r"^(\w+)\.blocks\.(\d+)\.(.+)$")
_LAYER_SCALE = {"gamma_1": "attn.proj", "ls1.gamma": "attn.proj", "gamma_2": "mlp.fc2", "ls2.gamma": "mlp.fc2"}
_QKV_PIECES = {"attn.q_bias": "q.bias", "attn.v_bias": "v.bias", "q.weight": "q.weight", "k.weight": "k.weight",
               "v.weight": "v.weight", "q.bias": "q.bias", "k.bias": "k.bias", "v.bias": "v.bias"}
_UNSUPPORTED = {  # block parameters of architectures this encoder cannot represent
    "attn.scale": "cosine attention (VideoMAE V2 cos_attn)",
    "attn.q_norm.weight": "query/key normalisation", "attn.relative_position_bias_table": "relative position bias",
}


@dataclass
class ImportReport:
    """What the import did with each key of a foreign checkpoint."""

    source: str
    layout: str = ""  # see LAYOUTS
    dtype: str = ""
    position_code: str | None = None  # the code the weights were trained with (None: the weights do not say)
    class_token: bool = False  # whether the weights have a class token (loaded as encoder.cls_token)
    loaded: list[str] = field(default_factory=list)  # target keys filled from the checkpoint
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it has no place in the model
    missing: list[str] = field(default_factory=list)  # encoder keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys of unknown meaning
    decoders: dict[str, str] = field(default_factory=dict)  # decoder -> "loaded" or why it stays fresh
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"source": self.source, "layout": self.layout, "dtype": self.dtype,
                "position_code": self.position_code, "class_token": self.class_token, "loaded": len(self.loaded),
                "dropped": self.dropped,
                "missing": self.missing, "unexpected": self.unexpected, "decoders": self.decoders,
                "notes": self.notes}

    def __str__(self) -> str:
        parts = [f"{self.source}: {self.layout} layout, {len(self.loaded)} tensors loaded"]
        groups: dict[str, int] = {}
        for reason in self.dropped.values():
            groups[reason] = groups.get(reason, 0) + 1
        parts += [f"dropped {n} ({reason})" for reason, n in groups.items()]
        parts += [f"{part}: {state}" for part, state in self.decoders.items()]
        if self.missing:
            parts.append(f"missing {self.missing}")
        if self.unexpected:
            parts.append(f"unexpected {self.unexpected}")
        return "; ".join(parts + self.notes)


class Collector:
    """Tensors of one checkpoint under expMAE keys. Converters call put / block / drop / unknown; finish() fuses
    split q / k / v projections (VideoMAE's q_bias / v_bias, transformers' query / key / value) into ``qkv`` and
    folds layer scale: gamma * f(x) is exactly f(x) with gamma folded into f's last linear layer."""

    def __init__(self, source: str, report: ImportReport):
        self.source, self.report = source, report
        self.state: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}  # expMAE key -> checkpoint key (for messages)
        self.merged: dict[str, list[str]] = {}  # expMAE key -> every checkpoint key fused into it
        self._qkv: dict[str, dict[str, tuple[torch.Tensor, str]]] = defaultdict(dict)
        self._scales: list[tuple[str, str, torch.Tensor]] = []

    def put(self, key: str, value: torch.Tensor, src: str) -> None:
        if key in self.state:
            raise ValueError(f"{self.source}: two keys map to {key!r} ({self.origin[key]!r} and {src!r}); "
                             "pass the wanted sub-dict")
        self.state[key], self.origin[key] = value.detach().to("cpu", torch.float32), src

    def drop(self, src: str, reason: str) -> None:
        self.report.dropped[src] = reason

    def unknown(self, src: str) -> None:
        self.report.unexpected.append(src)

    def block(self, prefix: str, sub: str, value: torch.Tensor, src: str) -> None:
        """One tensor of block ``prefix`` (e.g. "encoder.blocks.3"); ``sub`` in timm names or a q/k/v piece."""
        if sub in _QKV_PIECES:
            self._qkv[prefix][_QKV_PIECES[sub]] = (value, src)
        elif sub in _LAYER_SCALE:
            self._scales.append((src, f"{prefix}.{_LAYER_SCALE[sub]}", value))
        elif sub in _UNSUPPORTED:
            raise ValueError(f"{self.source}: {src!r} is {_UNSUPPORTED[sub]}, which the expMAE encoder does not have")
        else:
            self.put(f"{prefix}.{sub}", value, src)

    def finish(self) -> dict[str, torch.Tensor]:
        for prefix, pieces in self._qkv.items():
            if "q.weight" in pieces:  # separate projections: stack them
                weights = [pieces.get(f"{n}.weight") for n in "qkv"]
                if None in weights:
                    raise ValueError(f"{self.source}: {prefix} has only some of the query / key / value weights")
                self.put(f"{prefix}.attn.qkv.weight", torch.cat([w for w, _ in weights]), weights[0][1])
                self.merged[f"{prefix}.attn.qkv.weight"] = [src for _, src in weights]
            biases = [pieces.get(f"{n}.bias") for n in "qkv"]
            if any(biases):  # a missing key bias is zero: it would add a constant to every score of a query
                dim = next(b for b in biases if b)[0].shape[0]
                value = torch.cat([b[0].float() if b else torch.zeros(dim) for b in biases])
                self.put(f"{prefix}.attn.qkv.bias", value, next(b for b in biases if b)[1])
                self.merged[f"{prefix}.attn.qkv.bias"] = [b[1] for b in biases if b]
        for src, target, gamma in self._scales:
            if f"{target}.weight" not in self.state:
                raise ValueError(f"{self.source}: {src!r} without {target}.weight to fold it into")
            gamma = gamma.detach().to("cpu", torch.float32)
            self.state[f"{target}.weight"] = self.state[f"{target}.weight"] * gamma[:, None]
            self.state[f"{target}.bias"] = self.state[f"{target}.bias"] * gamma
        if self._qkv:
            self.report.notes.append("separate query / key / value projections or biases fused into attn.qkv")
        if self._scales:
            self.report.notes.append("layer scale (gamma) folded into attn.proj / mlp.fc2")
        return self.state


@dataclass
class Converted:
    state: dict[str, torch.Tensor]  # expMAE model keys; a Conv2d stem is inflated by fit()
    origin: dict[str, str]  # expMAE key -> checkpoint key
    position_code: str | None  # what the weights were trained with; None when they do not say
    merged: dict[str, list[str]] = field(default_factory=dict)  # expMAE key -> all checkpoint keys fused into it

    @property
    def class_token(self) -> bool:
        return "encoder.cls_token" in self.state


def block_key(key: str) -> tuple[str, str] | None:
    """("encoder.blocks.3", "attn.qkv.weight") for "encoder.blocks.3.attn.qkv.weight", else None."""
    m = _BLOCK.match(key)
    return (f"{m.group(1)}.blocks.{m.group(2)}", m.group(3)) if m else None


# ----------------------------------------------------------------------------------------------- fit to a model
def _inflate_stem(weight: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """A Conv2d stem (D, C, p, p) becomes the Conv3d (D, C, t, p, p) whose static tubelet is that Conv2d:
    w / t at every time step, so the frame path reproduces the image model exactly."""
    if weight.ndim != 4 or len(expected) != 5:
        return weight
    return (weight / expected[2]).unsqueeze(2).repeat(1, 1, expected[2], 1, 1)


def _fixed_codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fixed (buffer) position codes of an ExpMAE, under model keys."""
    return {k: v for k, v in model.named_buffers() if k.endswith(("pos_embed", "time_embed"))}


def fit(conv: Converted, model: torch.nn.Module, report: ImportReport, source: str) -> dict[str, torch.Tensor]:
    """The converted tensors that go into ``model`` (an ExpMAE, or an ExpMAEEncoder), under its own keys.

    Raises a one-line ValueError for an encoder of another size (naming the key and both shapes) and for a
    position code other than the model's. Fills report.loaded / dropped / missing / decoders / notes."""
    model = unwrap_model(model)
    if isinstance(model, ExpMAE):
        full, cfg = model, model.cfg
    elif isinstance(model, ExpMAEEncoder):
        full, cfg = None, model.cfg
    else:
        raise TypeError(f"expected an ExpMAE model or ExpMAEEncoder, got {type(model).__name__}")
    enc = full.encoder if full is not None else model
    expected = {f"encoder.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
    codes = {f"encoder.{k}": v for k, v in _fixed_codes(enc).items()}
    for part in PARTS[1:]:
        module = getattr(full, part, None) if full is not None else None
        if module is not None:
            expected.update({f"{part}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
            codes.update({f"{part}.{k}": v for k, v in _fixed_codes(module).items()})
    state = dict(conv.state)
    _check_depth(state, cfg, source)
    out: dict[str, torch.Tensor] = {}
    _fit_encoder(state, conv.origin, expected, codes, cfg, report, source, out)
    check_position_code(conv.position_code, cfg, source)
    check_class_token(conv.class_token, cfg, source)
    for part in PARTS[1:]:
        _fit_decoder(part, state, conv, expected, codes, report, out)
    report.unexpected += [conv.origin.get(k, k) for k in state]  # keys outside encoder and decoders
    report.loaded = sorted(out)
    prefix = "" if full is not None else "encoder."
    return {k[len(prefix):]: v for k, v in out.items()}


def _check_depth(state: dict, cfg: ExpMAEConfig, source: str) -> None:
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks.")}
    if blocks and len(blocks) != cfg.depth:
        raise ValueError(f"{source}: the checkpoint has {len(blocks)} encoder blocks (blocks.0-{max(blocks)}), "
                         f"the expMAE config has depth={cfg.depth}")


def check_position_code(code: str | None, cfg: ExpMAEConfig, source: str) -> None:
    if code is not None and code != cfg.position_code:
        raise ValueError(f"{source}: the weights were trained with position_code={code!r} "
                         f"({POSITION_CODE_HELP[code]}), the model has position_code={cfg.position_code!r}; set "
                         f"model.position_code={code} (ExpMAEConfig.position_code) to import them")


def check_class_token(has: bool, cfg: ExpMAEConfig, source: str) -> None:
    """As check_position_code: the encoder's tokens attended to a class token in training (or never saw one), so
    running the weights without it (or with a fresh one) would start from a damaged encoder."""
    if has != cfg.class_token:
        theirs = "have a class token (cls_token)" if has else "have no class token"
        raise ValueError(f"{source}: the weights {theirs}, the model has class_token={cfg.class_token}; set "
                         f"model.class_token={str(has).lower()} (ExpMAEConfig.class_token) to import them")


def _position_code(key: str, value: torch.Tensor, codes: dict, expected: dict, out: dict, report: ImportReport,
                   src: str) -> str | None:
    """Load a learned code, drop a fixed one equal to ours; return why not, when the two codes differ."""
    if key in expected and tuple(value.shape) == expected[key]:
        out[key] = value
        return None
    fixed = codes.get(key)
    if fixed is not None and tuple(value.shape) == tuple(fixed.shape):
        diff = (value - fixed.float()).abs().max().item()
        if diff <= 1e-4:
            report.dropped[src] = "fixed sin-cos position code (recomputed by expMAE)"
            return None
        return f"{src} differs from the model's fixed code by up to {diff:.3g} (a learned code: learn_pos_embed=True)"
    return f"{src} has shape {tuple(value.shape)}, the model's code {tuple(fixed.shape) if fixed is not None else None}"


def _fit_encoder(state, origin, expected, codes, cfg, report, source, out) -> None:
    position_codes = []
    for key in [k for k in state if k.startswith("encoder.")]:
        value, src, name = state.pop(key), origin.get(key, key), key[len("encoder."):]
        if name in ("pos_embed", "time_embed"):
            position_codes.append((key, value, src))  # checked once every weight is known to fit
            continue
        if key not in expected:  # e.g. a qkv bias for a config with qkv_bias=False
            report.unexpected.append(src)
            continue
        want = expected[key]
        if name == "patch_embed.proj.weight" and value.ndim == 4:
            want = (want[0], want[1], want[3], want[4])  # a Conv2d stem: checked as such, then inflated
        if tuple(value.shape) != want:
            stem = f" (a Conv2d stem, inflated to {expected[key]})" if want != expected[key] else ""
            raise ValueError(f"{source}: checkpoint key {src!r} has shape {tuple(value.shape)} but the expMAE encoder "
                             f"({describe_config(cfg)}) expects {want}{stem}{'' if src == name else f' for {name!r}'}")
        if want != expected[key]:
            value = _inflate_stem(value, expected[key])
            report.notes.append("Conv2d stem inflated to the Conv3d of a static tubelet (w / t per frame: exact)")
        out[key] = value
    for key, value, src in position_codes:
        why = _position_code(key, value, codes, expected, out, report, src)
        if why is not None:
            raise ValueError(f"{source}: the position code does not match this model: {why}")
    for key in expected:
        name = key[len("encoder."):]
        if not key.startswith("encoder.") or key in out or name in ("pos_embed", "time_embed"):
            continue
        if key.endswith("attn.qkv.bias") and key.replace("bias", "weight") in out:
            out[key] = torch.zeros(expected[key])  # a source without attention biases
            report.notes.append(f"{name}: zero (the checkpoint has no attention bias)")
        else:
            report.missing.append(name)


def _fit_decoder(part, state, conv: Converted, expected, codes, report, out) -> None:
    """All of a decoder when every shape matches, else none of it (it keeps its fresh init); reported."""
    found = {k: state.pop(k) for k in [k for k in state if k.startswith(f"{part}.")]}
    if not found:
        return
    sources = {k: conv.origin.get(k, k) for k in found}
    every_source = [src for k in found for src in conv.merged.get(k, [sources[k]])]
    wanted = {k: v for k, v in expected.items() if k.startswith(f"{part}.")}
    if not wanted:
        for src in every_source:
            report.dropped[src] = "decoder (pretraining only)"
        return
    loaded: dict[str, torch.Tensor] = {}
    problem = None
    for key, value in found.items():
        if key.endswith(("pos_embed", "time_embed")):
            problem = problem or _position_code(key, value, codes, expected, loaded, report, sources[key])
        elif key not in wanted or tuple(value.shape) != wanted[key]:
            problem = problem or (f"{sources[key]} has shape {tuple(value.shape)}, the model "
                                  f"{wanted.get(key, 'has no such key')}")
        else:
            loaded[key] = value
    for key in wanted:
        if key in loaded or key.endswith(("pos_embed", "time_embed")):
            continue
        if key.endswith("attn.qkv.bias") and key.replace("bias", "weight") in loaded:
            loaded[key] = torch.zeros(wanted[key])
        else:
            problem = problem or f"no {key}"
    if problem is None:
        out.update(loaded)
        report.decoders[part] = "loaded"
        return
    report.decoders[part] = f"freshly initialised ({problem})"
    for src in every_source:
        report.dropped.setdefault(src, f"{_PART_NAMES[part]} of another shape (left freshly initialised)")
