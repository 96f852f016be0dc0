"""ExpMAEConfig: every model hyper-parameter, defined once (default, help, checks), and the registry of sizes.

Torch-free on purpose: the training config (expmae.config) derives its ``model`` section from these fields and
validates a YAML file in well under a second, before torch is imported. Checks live in each field's metadata
(``choices``, ``min`` / ``max`` inclusive, ``gt`` / ``lt`` exclusive) and are run by ExpMAEConfig itself; the
checks that span fields (divisibility, mask counts) live in ``__post_init__``.
"""
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODES = ("expmae", "mae", "videomae")
POSITION_CODES = ("separable", "videomae")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SAMPLE_STRIDE = 4  # frames between a clip's frames, unless a run or an encoder folder records its own


def _f(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class ExpMAEConfig:
    """All model hyper-parameters; defaults are ViT-B/16, 16 frames x 224 px (the "base" entry of the registry)."""

    img_size: int = _f(224, "input height = width in pixels", min=1)
    num_frames: int = _f(16, "frames per clip", min=1)
    patch_size: int = _f(16, "ViT patch size", min=1)
    tubelet_size: int = _f(2, "frames per VideoMAE tubelet", min=1)
    in_chans: int = _f(3, "input channels", min=1)
    # shared encoder
    embed_dim: int = _f(768, "encoder width", min=1)
    depth: int = _f(12, "encoder blocks", min=1)
    num_heads: int = _f(12, "encoder attention heads", min=1)
    mlp_ratio: float = _f(4.0, "MLP hidden width / embed_dim", gt=0)
    qkv_bias: bool = _f(True, "bias in the qkv projection")
    drop_path_rate: float = _f(0.0, "stochastic depth rate", min=0, lt=1)
    # MAE frame decoder
    decoder_embed_dim: int = _f(512, "MAE (frame) decoder width", min=1)
    decoder_depth: int = _f(8, "MAE (frame) decoder blocks", min=1)
    decoder_num_heads: int = _f(16, "MAE (frame) decoder heads", min=1)
    # VideoMAE clip decoder
    video_decoder_embed_dim: int = _f(384, "VideoMAE decoder width", min=1)
    video_decoder_depth: int = _f(4, "VideoMAE decoder blocks", min=1)
    video_decoder_num_heads: int = _f(6, "VideoMAE decoder heads", min=1)
    # objective
    mode: str = _f("expmae", "which branches train the encoder", choices=MODES)
    mask_ratio: float = _f(0.75, "MAE random patch masking ratio", gt=0, lt=1)
    video_mask_ratio: float = _f(0.9, "VideoMAE tube masking ratio", gt=0, lt=1)
    norm_pix_loss: bool = _f(True, "per-patch normalised reconstruction targets")
    mae_loss_weight: float = _f(1.0, "weight of the MAE loss in the total", min=0)
    video_loss_weight: float = _f(1.0, "weight of the VideoMAE loss in the total", min=0)
    # position code of the encoder and the clip decoder: "separable" (MAE's 2-D code + a 1-D temporal code) or
    # "videomae" (VideoMAE's 1-D table over all tubelets, as official / transformers VideoMAE weights were trained);
    # frames always use the rows of the first tubelet time step (see expmae.model.position_codes)
    position_code: str = _f("separable", "position code: separable (2-D + temporal) or videomae (VideoMAE's 1-D "
                                         "table over all tubelets, as public VideoMAE weights)", choices=POSITION_CODES)
    # MAE's / ViTMAE's / timm's class token: a learned token prepended to every sequence the encoder runs (position
    # code zero, MAE's class slot), carried through the MAE frame decoder as MAE's decoder does, dropped before the
    # VideoMAE clip decoder (VideoMAE has none); see ExpMAEEncoder.forward_tokens
    class_token: bool = _f(False, "a learned class token in front of the encoder's tokens (as MAE / ViTMAE / timm "
                                  "ViTs; VideoMAE has none)")
    learn_pos_embed: bool = _f(False, "trainable position embeddings (initialised sin-cos) instead of fixed")
    grad_checkpointing: bool = _f(False, "activation checkpointing in the transformer blocks")
    # run both branches' visible tokens through the encoder as one packed sequence per clip, attention staying
    # within each branch: the same model and loss in fewer, larger matmuls (7-10% faster expMAE steps on CPU, see
    # tools/bench_pretrain.py). Only drop-path differs: a clip's two branches share their per-sample draws.
    pack_branches: bool = _f(True, "run both branches' visible tokens through the encoder in one call")
    # input normalisation of the clips the model receives (used to un-normalise targets and images)
    mean: tuple[float, ...] = _f(IMAGENET_MEAN, "input normalisation mean, one value per channel", min=0)
    std: tuple[float, ...] = _f(IMAGENET_STD, "input normalisation std, one value per channel", gt=0)

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _checked_type(f.name, getattr(self, f.name), f.type))
            _check_range(f.name, getattr(self, f.name), f.metadata)

        def fail(name: str, expected: str):
            raise ValueError(f"ExpMAEConfig.{name}={getattr(self, name)!r}: expected {expected}")

        if self.img_size % self.patch_size:
            fail("img_size", f"a multiple of patch_size={self.patch_size}")
        if self.num_frames % self.tubelet_size:
            fail("num_frames", f"a multiple of tubelet_size={self.tubelet_size}")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"),
                           ("video_decoder_embed_dim", "video_decoder_num_heads")):
            if getattr(self, dim) < 4 or getattr(self, dim) % 4 or getattr(self, dim) % getattr(self, heads):
                fail(dim, f"a positive multiple of 4 (sin-cos position code) and of {heads}={getattr(self, heads)}")
        num_kept = mae_num_kept(self.num_patches, self.mask_ratio)
        if not 0 < num_kept < self.num_patches:
            fail("mask_ratio", f"a ratio leaving 1..{self.num_patches - 1} of {self.num_patches} patches visible "
                               f"(int(N * (1 - ratio)) = {num_kept})")
        num_masked = tube_num_masked(self.num_patches, self.video_mask_ratio)
        if not 0 < num_masked < self.num_patches:
            fail("video_mask_ratio", f"a ratio masking 1..{self.num_patches - 1} of {self.num_patches} positions "
                                     f"per time step (int(ratio * N) = {num_masked})")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.in_chans:
                fail(name, f"{self.in_chans} values (one per input channel, in_chans={self.in_chans})")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per frame (= spatial positions per tubelet time step)."""
        return self.grid_size**2

    @property
    def num_time(self) -> int:
        """Tubelet time steps per clip."""
        return self.num_frames // self.tubelet_size

    def to_dict(self) -> dict:
        return asdict(self)


def mae_num_kept(length: int, ratio: float) -> int:
    return int(length * (1 - ratio))  # MAE's random_masking count


def tube_num_masked(length: int, ratio: float) -> int:
    return int(ratio * length)  # VideoMAE's TubeMaskingGenerator count


def _checked_type(name: str, value, kind):
    """Coerce YAML-ish values (int for float, list for tuple); reject anything else with a one-line error."""
    ok = True
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # tuple[float, ...]
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    if not ok:
        expected = getattr(kind, "__name__", None) if kind in (bool, int, float, str) else "a list of numbers"
        raise ValueError(f"ExpMAEConfig.{name}={value!r}: expected {expected}")
    return value


def _check_range(name: str, value, meta) -> None:
    """The field's metadata checks (choices, min, max, gt, lt), on each value of a tuple."""
    for v in value if isinstance(value, tuple) else (value,):
        if "choices" in meta and v not in meta["choices"]:
            raise ValueError(f"ExpMAEConfig.{name}={value!r}: expected one of {meta['choices']}")
        bounds = [(op, meta[op]) for op in ("min", "gt", "max", "lt") if op in meta]
        ok = {"min": v >= meta.get("min", v), "gt": "gt" not in meta or v > meta["gt"],
              "max": v <= meta.get("max", v), "lt": "lt" not in meta or v < meta["lt"]}
        if not all(ok.values()):
            words = {"min": ">=", "gt": ">", "max": "<=", "lt": "<"}
            raise ValueError(f"ExpMAEConfig.{name}={value!r}: expected a value "
                             f"{' and '.join(f'{words[op]} {b}' for op, b in bounds)}")


# name -> encoder size (timm ViT names) + decoders. VideoMAE's decoders: small 192/4/3, base 384/4/6, large 512/4/8;
# MAE's frame decoder: 512 wide, 8 deep, 16 heads for base/large; tiny/small get a scaled-down 256/4/8 (MAE has none).
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3,
                 decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
                 video_decoder_embed_dim=192, video_decoder_depth=4, video_decoder_num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6,
                  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
                  video_decoder_embed_dim=192, video_decoder_depth=4, video_decoder_num_heads=3),
    "base": dict(embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 video_decoder_embed_dim=384, video_decoder_depth=4, video_decoder_num_heads=6),
    "large": dict(embed_dim=1024, depth=24, num_heads=16,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                  video_decoder_embed_dim=512, video_decoder_depth=4, video_decoder_num_heads=8),
}


def list_models() -> list[str]:
    return list(MODEL_SIZES)


def get_config(name: str, **overrides) -> ExpMAEConfig:
    """The registry entry `name` with ExpMAEConfig field overrides applied (validated)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown expMAE model {name!r}: expected one of {list_models()}")
    known = {f.name for f in fields(ExpMAEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ExpMAEConfig field(s) {unknown}: expected some of {sorted(known)}")
    return ExpMAEConfig(**{**MODEL_SIZES[name], **overrides})
