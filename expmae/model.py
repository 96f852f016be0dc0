"""expMAE: one ViT encoder trained by two masked-autoencoding branches at once.

- MAE branch (appearance): one random frame per clip, random patch masking, a light frame decoder.
- VideoMAE branch (dynamics): t x p x p tubelets, tube masking, the clip decoder.
A frame enters the Conv3d stem as a static tubelet (the kernel summed over time), so the frame path is exactly a
timm ViT (expmae.weights.timm_frame). :meth:`ExpMAE.forward` reads as the table of contents: mask and embed each
branch, encode both in one packed pass, decode and score each branch.

Layouts (as MAE / VideoMAE / transformers): clips (B, C, T, H, W) normalised; tokens in (t, y, x) order; masks
(B, N) bool, True = masked; MAE patch pixels (p, p, C), VideoMAE tubelet pixels (t, p, p, C), C last.
"""
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from expmae.model_config import (IMAGENET_MEAN, IMAGENET_STD, MODEL_SIZES, MODES, POSITION_CODES,  # noqa: F401 (API)
                           ExpMAEConfig, get_config, list_models, mae_num_kept, tube_num_masked)
from expmae.pos_embed import (get_1d_sincos_pos_embed, get_2d_sincos_pos_embed, get_videomae_sincos_table,
                        spatiotemporal_pos_embed)
from expmae.vit import Block, LayerNorm, run_blocks


# --------------------------------------------------------------------------------------------------------------
# Config (expmae.model_config) and named sizes
# --------------------------------------------------------------------------------------------------------------
def create_model(name: str = "base", **overrides) -> "ExpMAE":
    """create_model("tiny", img_size=112, num_frames=8, mode="mae") -> ExpMAE with random init."""
    return ExpMAE(get_config(name, **overrides))


# --------------------------------------------------------------------------------------------------------------
# Patches, masks and the position codes that ride with them
# --------------------------------------------------------------------------------------------------------------
def patchify_frames(images: torch.Tensor, patch_size: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), pixels of each patch in (p, p, C) order (MAE).
    With ids (B, K) token indices: only those patches, (B, K, p*p*C), copying nothing else."""
    B, C, H, W = images.shape
    p, gw = patch_size, W // patch_size
    x = images.reshape(B, C, H // p, p, gw, p).permute(0, 2, 4, 3, 5, 1)  # a view: (B, y, x, p, p, C)
    if ids is None:
        return x.reshape(B, (H // p) * gw, p * p * C)
    return x[torch.arange(B, device=ids.device)[:, None], ids // gw, ids % gw].reshape(B, ids.shape[1], p * p * C)


def unpatchify_frames(patches: torch.Tensor, patch_size: int, img_size: int) -> torch.Tensor:
    B, N, D = patches.shape
    p, g = patch_size, img_size // patch_size
    C = D // (p * p)
    return patches.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


def patchify_clips(clips: torch.Tensor, tubelet_size: int, patch_size: int,
                   ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/t * H/p * W/p, t*p*p*C), pixels in (t, p, p, C) order (VideoMAE / HF).
    With ids (B, K) token indices: only those tubelets, (B, K, t*p*p*C), copying nothing else."""
    B, C, T, H, W = clips.shape
    t, p, gh, gw = tubelet_size, patch_size, H // patch_size, W // patch_size
    x = clips.reshape(B, C, T // t, t, gh, p, gw, p).permute(0, 2, 4, 6, 3, 5, 7, 1)  # a view: (B, t', y, x, ...)
    if ids is None:
        return x.reshape(B, (T // t) * gh * gw, t * p * p * C)
    rows = torch.arange(B, device=ids.device)[:, None]
    return x[rows, ids // (gh * gw), ids // gw % gh, ids % gw].reshape(B, ids.shape[1], t * p * p * C)


def unpatchify_clips(patches: torch.Tensor, tubelet_size: int, patch_size: int, img_size: int) -> torch.Tensor:
    B, N, D = patches.shape
    t, p, g = tubelet_size, patch_size, img_size // patch_size
    C = D // (t * p * p)
    x = patches.reshape(B, N // (g * g), g, g, t, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, C, (N // (g * g)) * t, g * p, g * p)


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """x * std + mean per channel (dim 1). Constants stay Python floats: exact, and no host-to-device copy."""
    return torch.cat([c * s + m for c, m, s in zip(x.split(1, dim=1), mean, std)], dim=1)


class Masking(NamedTuple):
    ids_keep: torch.Tensor  # (B, num_visible) token indices the encoder sees
    ids_restore: torch.Tensor  # (B, N) un-shuffles [visible, masked] back to token order
    mask: torch.Tensor  # (B, N) bool, True = masked
    ids_masked: torch.Tensor  # (B, N - num_visible) the masked token indices, ascending (= mask.nonzero() order)


def _masking_from_shuffle(ids_shuffle: torch.Tensor, num_keep: int) -> Masking:
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # a token is masked iff its rank in the shuffle falls after the kept ones; the masked ids go in token order,
    # so predictions over them line up with x[mask] (VideoMAE's / HF's convention for labels and logits)
    ids_masked = ids_shuffle[:, num_keep:].sort(dim=1).values
    return Masking(ids_shuffle[:, :num_keep], ids_restore, ids_restore >= num_keep, ids_masked)


def random_masking(batch: int, length: int, mask_ratio: float, device=None, generator=None) -> Masking:
    """MAE: per-sample random masking by argsort of uniform noise; keeps int(L * (1 - ratio)) tokens."""
    noise = torch.rand(batch, length, device=device, generator=generator)
    return _masking_from_shuffle(torch.argsort(noise, dim=1), mae_num_kept(length, mask_ratio))


def tube_masking(batch: int, num_time: int, num_spatial: int, mask_ratio: float, device=None,
                 generator=None) -> Masking:
    """VideoMAE: one random spatial mask per sample (int(ratio * N) positions), repeated at every time step."""
    num_keep = num_spatial - tube_num_masked(num_spatial, mask_ratio)
    noise = torch.rand(batch, num_spatial, device=device, generator=generator)
    spatial_shuffle = torch.argsort(noise, dim=1)[:, None, :]  # (B, 1, N)
    time_offsets = torch.arange(num_time, device=device)[None, :, None] * num_spatial  # (1, T', 1)
    ids_keep = (spatial_shuffle[..., :num_keep] + time_offsets).flatten(1)
    ids_masked = (spatial_shuffle[..., num_keep:] + time_offsets).flatten(1)
    return _masking_from_shuffle(torch.cat([ids_keep, ids_masked], dim=1), num_time * num_keep)


def masking_from_mask(mask: torch.Tensor, batch: int, length: int, name: str) -> Masking:
    """A caller-given (B, N) mask (True/1 = masked, the same count per sample) -> Masking, visible in token order."""
    if mask.ndim != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name}: expected shape ({batch}, {length}) (True = masked), got {tuple(mask.shape)}")
    mask = mask.bool()
    counts = mask.sum(dim=1).tolist()  # a host sync, acceptable on this explicit (test / visualisation) path
    if len(set(counts)) != 1 or not 0 < counts[0] < length:
        raise ValueError(f"{name}: every sample needs the same number of masked tokens in 1..{length - 1}, "
                         f"got per-sample counts {counts}")
    ids_shuffle = torch.argsort(mask.to(torch.int32), dim=1, stable=True)
    return _masking_from_shuffle(ids_shuffle, length - counts[0])


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[b, ids[b]] for (B, N, D) tokens and (B, K) ids -> (B, K, D); a (1, N, D) x (a position code) serves every
    sample. Whole rows via index_select: no host sync, and 2-3x faster than torch.gather's per-element index."""
    B, K = ids.shape
    if x.shape[0] == 1:
        rows, source = ids.reshape(-1), x[0]
    else:
        rows = (ids + torch.arange(B, device=ids.device)[:, None] * x.shape[1]).reshape(-1)
        source = x.reshape(-1, x.shape[-1])
    return source.index_select(0, rows).view(B, K, x.shape[-1])


def position_codes(cfg: ExpMAEConfig, dim: int, clips: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pos_embed, time_embed) of width ``dim`` for the encoder / clip decoder (clips) or the frame decoder.

    separable: pos_embed (1, N, dim) MAE's 2-D code, time_embed (1, T', dim) added per time step.
    videomae (clips only): pos_embed (1, T' * N, dim) VideoMAE's 1-D table over all tubelets, time_embed None.
    Frames are static tubelets at time step 0: under both codes their code is ``pos_embed[:, :N]`` (under videomae
    the table's first N rows), so the frame encoder (and its timm export) stays exact. The frame decoder has no
    VideoMAE counterpart and always uses MAE's 2-D code. A class token's code is zero (MAE's class slot): no row.
    """
    if not clips:
        return get_2d_sincos_pos_embed(dim, cfg.grid_size)[None], None
    if cfg.position_code == "videomae":
        return get_videomae_sincos_table(cfg.num_time * cfg.num_patches, dim), None
    return get_2d_sincos_pos_embed(dim, cfg.grid_size)[None], get_1d_sincos_pos_embed(dim, cfg.num_time)[None]


def _register_pos_embed(module: nn.Module, name: str, value: torch.Tensor | None, learnable: bool) -> None:
    # Fixed codes are non-persistent buffers: recomputed from the config, so checkpoints don't pin img_size.
    if learnable and value is not None:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value, persistent=False)


# --------------------------------------------------------------------------------------------------------------
# Shared encoder
# --------------------------------------------------------------------------------------------------------------
class PatchEmbed3d(nn.Module):
    """Tubelet stem (Conv3d, kernel = stride = (t, p, p)); a single image enters as a static tubelet."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T/t * H/p * W/p, D)."""
        return self.proj(clips).flatten(2).transpose(1, 2)

    def forward_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, D), equal to forward() on the image repeated t times."""
        # sum_tau W[:, :, tau] * x == Conv3d of the static tubelet, at 1/t of the cost; this summed kernel is
        # exactly the Conv2d weight of the exported timm model.
        weight = self.proj.weight.sum(dim=2)
        return F.conv2d(images, weight, self.proj.bias, stride=self.proj.stride[1:]).flatten(2).transpose(1, 2)

    # Masked pretraining embeds only the visible 10-25% of the tokens: the stem as a matmul on gathered pixels
    # (patchify_* with ids) skips the rest, forward and backward, which a convolution over the image cannot.
    def forward_tubelets(self, tubelets: torch.Tensor) -> torch.Tensor:
        """(..., t*p*p*C) tubelet pixels in patchify_clips order -> (..., D), the tokens forward() gives."""
        w = self.proj.weight  # (D, C, t, p, p) -> (D, t*p*p*C)
        return F.linear(tubelets, w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1), self.proj.bias)

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., p*p*C) frame patches in patchify_frames order -> (..., D), the tokens forward_frames() gives."""
        w = self.proj.weight.sum(dim=2)  # (D, C, p, p) -> (D, p*p*C)
        return F.linear(patches, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.proj.bias)


class ExpMAEEncoder(nn.Module):
    """ViT, keys named like timm's VisionTransformer (cls_token when cfg.class_token, patch_embed, blocks.i, norm)."""

    def __init__(self, cfg: ExpMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3d(cfg.patch_size, cfg.tubelet_size, cfg.in_chans, cfg.embed_dim)
        pos_embed, time_embed = position_codes(cfg, cfg.embed_dim)
        _register_pos_embed(self, "pos_embed", pos_embed, cfg.learn_pos_embed)
        _register_pos_embed(self, "time_embed", time_embed, cfg.learn_pos_embed)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.num_prefix_tokens = int(cfg.class_token)  # output rows before the patch / tubelet tokens (timm's name)
        drop_path = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear decay rule
        self.blocks = nn.ModuleList([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path[i])
                                     for i in range(cfg.depth)])
        self.norm = LayerNorm(cfg.embed_dim)
        self.grad_checkpointing = cfg.grad_checkpointing

    def frame_pos_embed(self) -> torch.Tensor:
        """(1, N, D) position code of a frame: the 2-D code, or the first time step's rows of VideoMAE's table."""
        return self.pos_embed[:, :self.cfg.num_patches]

    def clip_pos_embed(self, num_time: int) -> torch.Tensor:
        """(1, num_time * N, D) position code of the tubelets of num_time time steps, token order (t, y, x)."""
        if self.time_embed is None:  # VideoMAE's table
            return self.pos_embed[:, :num_time * self.cfg.num_patches]
        return spatiotemporal_pos_embed(self.pos_embed, self.time_embed[:, :num_time])

    def embed_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens + the frame position code, (B, N, D)."""
        C, S = self.cfg.in_chans, self.cfg.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (C, S, S):
            raise ValueError(f"images: expected shape (B, {C}, {S}, {S}), got {tuple(images.shape)}")
        x = self.patch_embed.forward_frames(images.to(self.patch_embed.proj.weight.dtype))
        return x + self.frame_pos_embed()

    def embed_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> tubelet tokens + the clip position code, (B, T/t * N, D)."""
        _check_clips(clips, self.cfg)
        x = self.patch_embed(clips.to(self.patch_embed.proj.weight.dtype))
        return x + self.clip_pos_embed(clips.shape[2] // self.cfg.tubelet_size)

    def embed_visible_frames(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """embed_frames(images) at ids_keep (B, K), computed from those K patches only: (B, K, D)."""
        x = self.patch_embed.forward_patches(patchify_frames(images, self.cfg.patch_size, ids_keep).to(self.dtype))
        return x + gather_tokens(self.frame_pos_embed(), ids_keep)

    def embed_visible_clips(self, clips: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """embed_clips(clips) at ids_keep (B, K), computed from those K tubelets only: (B, K, D)."""
        _check_clips(clips, self.cfg)
        cfg = self.cfg
        tubelets = patchify_clips(clips, cfg.tubelet_size, cfg.patch_size, ids_keep).to(self.dtype)
        pos = self.clip_pos_embed(clips.shape[2] // cfg.tubelet_size)
        x = self.patch_embed.forward_tubelets(tubelets)
        return x + gather_tokens(pos, ids_keep)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward_tokens(self, x: torch.Tensor, segments: list[int] | None = None) -> torch.Tensor:
        """Transformer blocks + final norm on any (visible) subset of embedded tokens (B, K, D) -> (B, P + K, D), P =
        num_prefix_tokens (the class token, first). segments: lengths of independent sequences packed along dim 1
        (attention stays within each; see ExpMAEConfig.pack_branches); each gets its own class token in front."""
        if self.cls_token is not None:
            x, segments = self.prepend_class_token(x, segments)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing, segments))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        """Embedded tokens (B, K, D) -> {i: hidden state i after the final norm, (B, P + K, D)} for every i in
        ``indices`` (0 = the embedded tokens with their position code, i = the output of block i, 0..depth).

        Every state gets the final LayerNorm, as timm's forward_intermediates(norm=True): one scale for all depths,
        and state ``depth`` is exactly forward_tokens(x). Blocks past the deepest index are not run."""
        bad = [i for i in indices if not 0 <= i <= len(self.blocks)]
        if bad:
            raise ValueError(f"hidden state {bad[0]}: expected 0..{len(self.blocks)} (0 = embeddings, i = block i)")
        if self.cls_token is not None:
            x, _ = self.prepend_class_token(x, None)
        wanted, out = set(indices), {}
        for i in range(max(indices) + 1):
            if i > 0:
                x = run_blocks(self.blocks[i - 1 : i], x, self.grad_checkpointing)
            if i in wanted:
                out[i] = self.norm(x)
        return out

    def prepend_class_token(self, x: torch.Tensor, segments: list[int] | None) -> tuple[torch.Tensor, list[int] | None]:
        """(B, sum K_i, D) -> (B, sum (1 + K_i), D): the class token, position code zero (MAE), before each segment."""
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        if segments is None:
            return torch.cat([cls, x], dim=1), None
        parts = [t for part in x.split(segments, dim=1) for t in (cls, part)]
        return torch.cat(parts, dim=1), [1 + n for n in segments]

    def forward_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> all tokens after the final norm (B, P + N, D) (= timm forward_features)."""
        return self.forward_tokens(self.embed_frames(images))

    def forward_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> all tokens after the final norm (B, P + T/t * N, D)."""
        return self.forward_tokens(self.embed_clips(clips))


def _check_clips(clips: torch.Tensor, cfg: ExpMAEConfig) -> None:
    C, S, t = cfg.in_chans, cfg.img_size, cfg.tubelet_size
    if (not torch.is_tensor(clips) or not clips.is_floating_point() or clips.ndim != 5
            or tuple(clips.shape[1:2] + clips.shape[3:]) != (C, S, S)
            or clips.shape[2] % t or not 0 < clips.shape[2] <= cfg.num_frames):
        shape = tuple(clips.shape) if torch.is_tensor(clips) else type(clips).__name__
        dtype = clips.dtype if torch.is_tensor(clips) else None
        raise ValueError(f"clips: expected a float tensor (B, {C}, T, {S}, {S}) with T a multiple of "
                         f"tubelet_size={t} and at most num_frames={cfg.num_frames}, got {shape} {dtype}")


# --------------------------------------------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------------------------------------------
class MaskedDecoder(nn.Module):
    """Visible latents + one mask token per masked position, each + its position code -> blocks -> pixels of the
    masked tokens.

    MAE's decoder with a 2-D code, VideoMAE's with the clip code (see position_codes). As in VideoMAE, the
    tokens stay in [visible, masked] order (attention does not care about order; the position codes say where each
    token is), and the final norm and pixel head run on the masked tokens only: those are what the loss reads.
    """

    def __init__(self, encoder_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, patch_dim: int,
                 codes: tuple[torch.Tensor, torch.Tensor | None], embed_bias: bool = True,
                 learn_pos_embed: bool = False):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim, bias=embed_bias)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        _register_pos_embed(self, "pos_embed", codes[0], learn_pos_embed)  # codes: position_codes(...)
        _register_pos_embed(self, "time_embed", codes[1], learn_pos_embed)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)
        self.grad_checkpointing = False

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """(B, P + K, D_enc) latents: P prefix rows (a class token, carried with position code zero as in MAE's
        decoder) then the tokens ids_keep (B, K); ids_masked (B, M) -> (B, M, patch_dim) predictions for the masked
        tokens, in the order of ids_masked."""
        x = self.embed(latent)
        K = ids_keep.shape[1]
        P = x.shape[1] - K
        num_tokens = K + ids_masked.shape[1]
        if self.time_embed is None:  # MAE's 2-D code (N rows) or VideoMAE's table (T' * N rows)
            pos = self.pos_embed[:, :num_tokens]
        else:
            pos = spatiotemporal_pos_embed(self.pos_embed, self.time_embed[:, : num_tokens // self.pos_embed.shape[1]])
        x = torch.cat([x[:, :P], x[:, P:] + gather_tokens(pos, ids_keep),
                       self.mask_token.to(x.dtype) + gather_tokens(pos, ids_masked)], dim=1)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.head(self.norm(x[:, P + K:]))


# --------------------------------------------------------------------------------------------------------------
# expMAE
# --------------------------------------------------------------------------------------------------------------
class MaeInputs(NamedTuple):
    """What the MAE branch feeds the encoder, and keeps for its loss."""
    frames: torch.Tensor  # (B, C, H, W) the chosen frame of each clip
    frame_idx: torch.Tensor  # (B,)
    masking: Masking  # over the N patches of the frame
    tokens: torch.Tensor  # (B, K, D) the embedded visible patches


class VideoInputs(NamedTuple):
    """What the VideoMAE branch feeds the encoder, and keeps for its loss."""
    clips: torch.Tensor  # (B, C, T, H, W)
    masking: Masking  # tube masking over the T' * N tubelets
    tokens: torch.Tensor  # (B, K', D) the embedded visible tubelets


class ExpMAE(nn.Module):
    """Shared encoder + MAE frame decoder (`mae_decoder`) + VideoMAE clip decoder (`video_decoder`), per cfg.mode."""

    def __init__(self, cfg: ExpMAEConfig):
        super().__init__()
        self.cfg = cfg
        p, t, C = cfg.patch_size, cfg.tubelet_size, cfg.in_chans
        self.encoder = ExpMAEEncoder(cfg)
        # A disabled branch has no decoder at all: no dead parameters for DDP / DeepSpeed to trip over.
        self.mae_decoder = self.video_decoder = None
        if cfg.mode in ("expmae", "mae"):
            self.mae_decoder = MaskedDecoder(cfg.embed_dim, cfg.mae_decoder_embed_dim, cfg.mae_decoder_depth,
                                             cfg.mae_decoder_num_heads, cfg.mlp_ratio, p * p * C,
                                             position_codes(cfg, cfg.mae_decoder_embed_dim, clips=False),
                                             embed_bias=True, learn_pos_embed=cfg.learn_pos_embed)
        if cfg.mode in ("expmae", "videomae"):
            # VideoMAE's encoder_to_decoder projection has no bias
            self.video_decoder = MaskedDecoder(cfg.embed_dim, cfg.video_decoder_embed_dim, cfg.video_decoder_depth,
                                               cfg.video_decoder_num_heads, cfg.mlp_ratio, t * p * p * C,
                                               position_codes(cfg, cfg.video_decoder_embed_dim), embed_bias=False,
                                               learn_pos_embed=cfg.learn_pos_embed)
        self._init_weights()
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        # every load_state_dict (accelerate's load_state when resuming, DeepSpeed's engine) reads earlier key names
        self.register_load_state_dict_pre_hook(_upgrade_state_dict_hook)

    def _init_weights(self) -> None:
        # MAE's initialisation: xavier-uniform linears (and the stem, seen as a linear), N(0, .02) mask tokens.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for decoder in (self.mae_decoder, self.video_decoder):
            if decoder is not None:
                nn.init.normal_(decoder.mask_token, std=0.02)
        if self.encoder.cls_token is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, clips: torch.Tensor, *, frame_idx: torch.Tensor | int | None = None,
                mask_mae: torch.Tensor | None = None, mask_video: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """clips (B, C, T, H, W) ImageNet-normalised, any float dtype (cast to the model's; targets are computed
        from the clips as given, so pass float32 for exact targets). frame_idx / masks override the random draws
        (masks: (B, N) True = masked); generator (on the clips' device) drives the random draws.

        Returns loss (weighted total), loss_mae / loss_video (float32 scalars, only for enabled branches),
        mask_mae (B, N), frame_idx (B,), mask_video (B, N') and the predictions of the masked tokens only, in token
        order (VideoMAE's / HF's logits): pred_mae (B, M, p*p*C) with M masked of N, pred_video (B, M', t*p*p*C).
        So pred_video lines up with patchify_clips(...)[mask_video].reshape(B, M', -1).
        """
        _check_clips(clips, self.cfg)
        # 1. mask and embed: each branch's visible tokens
        mae = self.mae_tokens(clips, frame_idx, mask_mae, generator) if self.mae_decoder is not None else None
        video = self.video_tokens(clips, mask_video, generator) if self.video_decoder is not None else None
        # 2. encode: the shared encoder, both branches in one packed pass (cfg.pack_branches)
        latent_mae, latent_video = self.encode(mae.tokens if mae else None, video.tokens if video else None)
        # 3. decode and score each branch
        out: dict[str, torch.Tensor] = {}
        if mae is not None:
            out.update(self.mae_loss(mae, latent_mae))
        if video is not None:
            out.update(self.video_loss(video, latent_video))
        out["loss"] = self.weighted_loss(out)
        return out

    def weighted_loss(self, losses: dict) -> torch.Tensor | float:
        """The total the model trains on: its branches' losses (loss_mae, loss_video; a missing one is an absent
        branch) weighted by cfg.mae_loss_weight / cfg.video_loss_weight."""
        return (self.cfg.mae_loss_weight * losses["loss_mae"] if "loss_mae" in losses else 0.0) + (
            self.cfg.video_loss_weight * losses["loss_video"] if "loss_video" in losses else 0.0)

    def forward_mae(self, clips, frame_idx=None, mask=None, generator=None) -> dict[str, torch.Tensor]:
        """MAE branch: one frame per clip, random patch masking, reconstruct its masked patches."""
        _check_clips(clips, self.cfg)
        mae = self.mae_tokens(clips, frame_idx, mask, generator)
        return self.mae_loss(mae, self.encoder.forward_tokens(mae.tokens))

    def forward_video(self, clips, mask=None, generator=None) -> dict[str, torch.Tensor]:
        """VideoMAE branch: tube masking, reconstruct the masked tubelets."""
        _check_clips(clips, self.cfg)
        video = self.video_tokens(clips, mask, generator)
        return self.video_loss(video, self.encoder.forward_tokens(video.tokens))

    def encode(self, *tokens: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The shared encoder on each branch's visible tokens (None: branch off); with cfg.pack_branches the
        branches go through as one sequence per clip, attention staying within each."""
        present = [t for t in tokens if t is not None]
        if self.cfg.pack_branches and len(present) > 1:
            segments = [t.shape[1] for t in present]
            rows = [self.encoder.num_prefix_tokens + n for n in segments]  # each with its own class token
            latents = iter(self.encoder.forward_tokens(torch.cat(present, dim=1), segments).split(rows, dim=1))
        else:
            latents = iter([self.encoder.forward_tokens(t) for t in present])
        return [next(latents) if t is not None else None for t in tokens]

    def mae_tokens(self, clips, frame_idx=None, mask=None, generator=None) -> "MaeInputs":
        """MAE branch, step 1: pick a frame per clip, mask its patches, embed the visible ones."""
        B, T, N = clips.shape[0], clips.shape[2], self.cfg.num_patches
        if frame_idx is None:
            frame_idx = torch.randint(T, (B,), device=clips.device, generator=generator)
        else:
            frame_idx = torch.as_tensor(frame_idx, device=clips.device).long()
            if frame_idx.shape not in ((), (B,)):
                raise ValueError(f"frame_idx: expected an int or shape ({B},), got shape {tuple(frame_idx.shape)}")
            frame_idx = frame_idx.expand(B)
        frames = clips.transpose(1, 2)[torch.arange(B, device=clips.device), frame_idx]  # (B, C, H, W)
        if mask is None:
            masking = random_masking(B, N, self.cfg.mae_mask_ratio, clips.device, generator)
        else:
            masking = masking_from_mask(mask.to(clips.device), B, N, "mask_mae")
        return MaeInputs(frames, frame_idx, masking, self.encoder.embed_visible_frames(frames, masking.ids_keep))

    def mae_loss(self, mae: "MaeInputs", latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """MAE branch, step 3: decode the latents into the masked patches and score them."""
        pred = self.mae_decoder(latent, mae.masking.ids_keep, mae.masking.ids_masked)
        loss = F.mse_loss(pred.float(), self.mae_target(mae.frames, mae.masking.ids_masked))
        return {"loss_mae": loss, "pred_mae": pred, "mask_mae": mae.masking.mask, "frame_idx": mae.frame_idx}

    def video_tokens(self, clips, mask=None, generator=None) -> "VideoInputs":
        """VideoMAE branch, step 1: tube-mask the clip, embed the visible tubelets."""
        B, N = clips.shape[0], self.cfg.num_patches
        num_time = clips.shape[2] // self.cfg.tubelet_size
        if mask is None:
            masking = tube_masking(B, num_time, N, self.cfg.video_mask_ratio, clips.device, generator)
        else:
            masking = masking_from_mask(mask.to(clips.device), B, num_time * N, "mask_video")
        return VideoInputs(clips, masking, self.encoder.embed_visible_clips(clips, masking.ids_keep))

    def video_loss(self, video: "VideoInputs", latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """VideoMAE branch, step 3: decode the latents into the masked tubelets and score them (VideoMAE's decoder has
        no class token: it sees the tubelet latents only)."""
        latent = latent[:, self.encoder.num_prefix_tokens:]
        pred = self.video_decoder(latent, video.masking.ids_keep, video.masking.ids_masked)
        loss = F.mse_loss(pred.float(), self.video_target(video.clips, video.masking.ids_masked))
        return {"loss_video": loss, "pred_video": pred, "mask_video": video.masking.mask}

    # ---- targets (float32) ---------------------------------------------------------------------------------------
    # Statistics are two-pass (the mean, then the norm of the deviations): exact enough in float32 for pixel data and
    # several times faster on CPU than torch.var / var_mean, whose Welford loop dominated the target's cost.
    @torch.no_grad()  # a constant of the loss, as in MAE / VideoMAE / HF
    def mae_target(self, frames: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """MAE: patches of the normalised frame, (B, N, p*p*C), or with ids (B, K) only those patches (B, K, p*p*C);
        norm_pix normalises each patch over all its p*p*C values: (x - mean) / sqrt(var + 1e-6), var unbiased."""
        target = patchify_frames(frames.float(), self.cfg.patch_size, ids)
        if not self.cfg.norm_pix_loss:
            return target
        deviation = target - target.mean(dim=-1, keepdim=True)
        var = torch.linalg.vector_norm(deviation, dim=-1, keepdim=True).square_().div_(target.shape[-1] - 1)
        return deviation.div_(var.add_(1.0e-6).sqrt_())

    @torch.no_grad()  # a constant of the loss, as in MAE / VideoMAE / HF
    def video_target(self, clips: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """VideoMAE: tubelets of the clip un-normalised to [0, 1], (B, N', t*p*p*C), or with ids (B, K) only those
        tubelets (B, K, t*p*p*C); norm_pix normalises each colour channel over the t*p*p values of a tubelet
        (unbiased std + 1e-6, as VideoMAE / HF)."""
        cfg, t, p = self.cfg, self.cfg.tubelet_size, self.cfg.patch_size
        if not cfg.norm_pix_loss:
            return patchify_clips(unnormalize(clips.float(), cfg.mean, cfg.std), t, p, ids)
        # With u = x * s + m (un-normalised), (u - mean u) / (std u + eps) = (x - mean x) / (std x + eps / s): the
        # un-normalisation cancels but for eps, so it is skipped. Tubelets are gathered channel-major, making each
        # reduction run over contiguous memory; only the result is reordered to the (t, p, p, C) layout.
        B, C, T, H, W = clips.shape
        x = clips.float().reshape(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.reshape(B, -1, C * t * p * p)
        if ids is not None:  # rows of contiguous memory: much faster than advanced indexing of the 8-D view
            x = gather_tokens(x, ids)
        x = x.view(B, x.shape[1], C, t * p * p)
        mean = x.mean(dim=-1, keepdim=True)
        # in place only on the gathered copy: without ids, x may be a view of the clips
        deviation = x.sub_(mean) if ids is not None else x - mean
        denominator = torch.linalg.vector_norm(deviation, dim=-1, keepdim=True).div_((t * p * p - 1) ** 0.5)
        for c, s in enumerate(cfg.std):
            denominator[:, :, c].add_(1e-6 / s)
        return deviation.div_(denominator).transpose(-1, -2).reshape(B, -1, t * p * p * C)

    # ---- training helpers ----------------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (timm convention): mask / class tokens, learned position codes."""
        return {name for name, _ in self.named_parameters()
                if name.endswith(("mask_token", "cls_token", "pos_embed", "time_embed"))}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in (self.encoder, self.mae_decoder, self.video_decoder):
            if module is not None:
                module.grad_checkpointing = enable


# Old key prefix -> current one, so checkpoints that name the MAE frame decoder `decoder` still load and resume.
RENAMED_KEYS: dict[str, str] = {"decoder.": "mae_decoder."}


def upgrade_state_dict(state: dict, prefix: str = "") -> dict:
    """Rename, in place, the keys of an ExpMAE state dict written by an earlier expMAE (RENAMED_KEYS) that follow
    ``prefix`` (a wrapper's, e.g. "module."); returns ``state``. Keys already in today's names are left alone."""
    for old, new in RENAMED_KEYS.items():
        for key in [k for k in state if k.startswith(prefix + old)]:
            state[prefix + new + key[len(prefix + old):]] = state.pop(key)
    return state


def _upgrade_state_dict_hook(module, state_dict, prefix, *args) -> None:
    upgrade_state_dict(state_dict, prefix)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DeepSpeed engine wrapper, or the model itself."""
    return getattr(model, "module", model)


def unwrap_encoder(model: nn.Module) -> ExpMAEEncoder:
    """The ExpMAEEncoder of an ExpMAE model (DDP / DeepSpeed-wrapped or not), or the encoder itself."""
    model = unwrap_model(model)
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, ExpMAEEncoder):
        raise TypeError(f"expected an ExpMAE model or ExpMAEEncoder, got {type(model).__name__}")
    return encoder
