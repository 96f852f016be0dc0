"""ExpMAEConfig: every model hyper-parameter, defined once (default, help, checks), and the registry of sizes.

Torch-free: the training config (expmae.config) derives its ``model`` section from these fields. Each field's
checks are in its metadata (expmae.settings); those that span fields (divisibility, mask counts) in ``__post_init__``.
Constructed from Python, a field takes its own type only (ints for floats, lists for tuples).
"""
from dataclasses import asdict, dataclass, fields

from expmae.settings import check, rename, rename_keys, setting, strict_type

MODES = ("expmae", "mae", "videomae")
POSITION_CODES = ("separable", "videomae")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SAMPLE_STRIDE = 4  # frames between a clip's frames, unless a run or an encoder folder records its own


@dataclass
class ExpMAEConfig:
    """All model hyper-parameters; defaults are ViT-B/16, 16 frames x 224 px (the "base" entry of the registry)."""

    img_size: int = setting(224, "input height = width in pixels", min=1)
    num_frames: int = setting(16, "frames per clip", min=1)
    patch_size: int = setting(16, "ViT patch size", min=1)
    tubelet_size: int = setting(2, "frames per VideoMAE tubelet", min=1)
    in_chans: int = setting(3, "input channels", min=1)
    # shared encoder
    embed_dim: int = setting(768, "encoder width", min=1)
    depth: int = setting(12, "encoder blocks", min=1)
    num_heads: int = setting(12, "encoder attention heads", min=1)
    mlp_ratio: float = setting(4.0, "MLP hidden width / embed_dim", gt=0)
    qkv_bias: bool = setting(True, "bias in the qkv projection")
    drop_path_rate: float = setting(0.0, "stochastic depth rate", min=0, lt=1)
    # MAE frame decoder
    mae_decoder_embed_dim: int = setting(512, "MAE (frame) decoder width", min=1)
    mae_decoder_depth: int = setting(8, "MAE (frame) decoder blocks", min=1)
    mae_decoder_num_heads: int = setting(16, "MAE (frame) decoder heads", min=1)
    # VideoMAE clip decoder
    video_decoder_embed_dim: int = setting(384, "VideoMAE decoder width", min=1)
    video_decoder_depth: int = setting(4, "VideoMAE decoder blocks", min=1)
    video_decoder_num_heads: int = setting(6, "VideoMAE decoder heads", min=1)
    # objective
    mode: str = setting("expmae", "which branches train the encoder", choices=MODES)
    mae_mask_ratio: float = setting(0.75, "MAE random patch masking ratio", gt=0, lt=1)
    video_mask_ratio: float = setting(0.9, "VideoMAE tube masking ratio", gt=0, lt=1)
    norm_pix_loss: bool = setting(True, "per-patch normalised reconstruction targets")
    mae_loss_weight: float = setting(1.0, "weight of the MAE loss in the total", min=0)
    video_loss_weight: float = setting(1.0, "weight of the VideoMAE loss in the total", min=0)
    # position code of the encoder and the clip decoder: "separable" (MAE's 2-D code + a 1-D temporal code) or
    # "videomae" (VideoMAE's 1-D table over all tubelets, as official / transformers VideoMAE weights were trained);
    # frames always use the rows of the first tubelet time step (see expmae.model.position_codes)
    position_code: str = setting("separable", "position code: separable (2-D + temporal) or videomae (VideoMAE's 1-D "
                                         "table over all tubelets, as public VideoMAE weights)", choices=POSITION_CODES)
    # MAE's / ViTMAE's / timm's class token: a learned token prepended to every sequence the encoder runs (position
    # code zero, MAE's class slot), carried through the MAE frame decoder as MAE's decoder does, dropped before the
    # VideoMAE clip decoder (VideoMAE has none); see ExpMAEEncoder.forward_tokens
    class_token: bool = setting(False, "a learned class token in front of the encoder's tokens (as MAE / ViTMAE / timm "
                                  "ViTs; VideoMAE has none)")
    learn_pos_embed: bool = setting(False, "trainable position embeddings (initialised sin-cos) instead of fixed")
    grad_checkpointing: bool = setting(False, "activation checkpointing in the transformer blocks")
    # run both branches' visible tokens through the encoder as one packed sequence per clip, attention staying
    # within each branch: the same model and loss in fewer, larger matmuls (7-10% faster expMAE steps on CPU, see
    # tools/bench_pretrain.py). Only drop-path differs: a clip's two branches share their per-sample draws.
    pack_branches: bool = setting(True, "run both branches' visible tokens through the encoder in one call")
    # input normalisation of the clips the model receives (used to un-normalise targets and images)
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, "input normalisation mean, one value per channel", min=0)
    std: tuple[float, ...] = setting(IMAGENET_STD, "input normalisation std, one value per channel", gt=0)

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, strict_type(f"ExpMAEConfig.{f.name}", getattr(self, f.name), f.type))
            check(f"ExpMAEConfig.{f.name}", getattr(self, f.name), dict(f.metadata))

        def fail(name: str, expected: str):
            raise ValueError(f"ExpMAEConfig.{name}={getattr(self, name)!r}: expected {expected}")

        if self.img_size % self.patch_size:
            fail("img_size", f"a multiple of patch_size={self.patch_size}")
        if self.num_frames % self.tubelet_size:
            fail("num_frames", f"a multiple of tubelet_size={self.tubelet_size}")
        for dim, heads in (("embed_dim", "num_heads"), ("mae_decoder_embed_dim", "mae_decoder_num_heads"),
                           ("video_decoder_embed_dim", "video_decoder_num_heads")):
            if getattr(self, dim) < 4 or getattr(self, dim) % 4 or getattr(self, dim) % getattr(self, heads):
                fail(dim, f"a positive multiple of 4 (sin-cos position code) and of {heads}={getattr(self, heads)}")
        num_kept = mae_num_kept(self.num_patches, self.mae_mask_ratio)
        if not 0 < num_kept < self.num_patches:
            fail("mae_mask_ratio", f"a ratio leaving 1..{self.num_patches - 1} of {self.num_patches} patches "
                                   f"visible (int(N * (1 - ratio)) = {num_kept})")
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

    def __getattr__(self, name: str):  # only for names that are not fields: a script's read of an old spelling
        if name in RENAMED:
            return getattr(self, rename(name, RENAMED, "ExpMAEConfig."))
        raise AttributeError(f"'ExpMAEConfig' object has no attribute {name!r}")


def mae_num_kept(length: int, ratio: float) -> int:
    return int(length * (1 - ratio))  # MAE's random_masking count


def tube_num_masked(length: int, ratio: float) -> int:
    return int(ratio * length)  # VideoMAE's TubeMaskingGenerator count


# Old spelling -> field: the MAE frame branch's settings once had no prefix. Settings written by hand under an old
# name work with a FutureWarning (expmae.settings.rename); files an earlier expmae wrote are read silently.
RENAMED: dict[str, str] = {"decoder_embed_dim": "mae_decoder_embed_dim", "decoder_depth": "mae_decoder_depth",
                           "decoder_num_heads": "mae_decoder_num_heads", "mask_ratio": "mae_mask_ratio"}


def upgrade_config_dict(data: dict) -> dict:
    """ExpMAEConfig fields saved by an earlier expmae (a checkpoint's model_config.json, an encoder folder's config)
    under today's names, silently."""
    return rename_keys(data, RENAMED, where=None)


# name -> encoder size (timm ViT names) + decoders. VideoMAE's decoders: small 192/4/3, base 384/4/6, large 512/4/8;
# MAE's frame decoder: 512 wide, 8 deep, 16 heads for base/large; tiny/small get a scaled-down 256/4/8 (MAE has none).
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3,
                 mae_decoder_embed_dim=256, mae_decoder_depth=4, mae_decoder_num_heads=8,
                 video_decoder_embed_dim=192, video_decoder_depth=4, video_decoder_num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6,
                  mae_decoder_embed_dim=256, mae_decoder_depth=4, mae_decoder_num_heads=8,
                  video_decoder_embed_dim=192, video_decoder_depth=4, video_decoder_num_heads=3),
    "base": dict(embed_dim=768, depth=12, num_heads=12,
                 mae_decoder_embed_dim=512, mae_decoder_depth=8, mae_decoder_num_heads=16,
                 video_decoder_embed_dim=384, video_decoder_depth=4, video_decoder_num_heads=6),
    "large": dict(embed_dim=1024, depth=24, num_heads=16,
                  mae_decoder_embed_dim=512, mae_decoder_depth=8, mae_decoder_num_heads=16,
                  video_decoder_embed_dim=512, video_decoder_depth=4, video_decoder_num_heads=8),
}


def list_models() -> list[str]:
    return list(MODEL_SIZES)


def get_config(name: str, **overrides) -> ExpMAEConfig:
    """The registry entry `name` with ExpMAEConfig field overrides applied (validated); a field's old name (RENAMED)
    works with a FutureWarning."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown expMAE model {name!r}: expected one of {list_models()}")
    overrides = rename_keys(overrides, RENAMED, "ExpMAEConfig.")
    known = {f.name for f in fields(ExpMAEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ExpMAEConfig field(s) {unknown}: expected some of {sorted(known)}")
    return ExpMAEConfig(**{**MODEL_SIZES[name], **overrides})
