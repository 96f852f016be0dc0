"""Write tests/fixtures/compat/: a tiny pretraining checkpoint, its exported encoder folder and the outputs they
must keep giving (tests/test_compat_fixtures.py). Run once, with the code whose files later versions must read:

    python tools/make_fixtures.py            # (re)writes tests/fixtures/compat/

Rerunning it with a later version is only right when the file format changed on purpose (and a loader for the
old one exists or old files are declared unreadable in the CHANGELOG).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from expmae.checkpoint import save_checkpoint
from expmae.export import create_timm_model, export_encoder, load_encoder
from expmae.model import create_model

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "compat"
# 32 px, patch 8, 4 frames, tubelet 2, width 32, 2 blocks, a class token: every weight kind, a few hundred KB.
CONFIG = dict(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=2, num_heads=2, mae_decoder_embed_dim=16,
              mae_decoder_depth=1, mae_decoder_num_heads=2, video_decoder_embed_dim=16, video_decoder_depth=1,
              video_decoder_num_heads=2, class_token=True)


def fixed_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"clips": torch.randn(2, 3, 4, 32, 32, generator=g), "images": torch.randn(2, 3, 32, 32, generator=g)}


def write_checkpoint(run: Path) -> torch.nn.Module:
    """One AdamW step, then save_checkpoint as pretrain/train.py calls it (accelerate state + weights)."""
    torch.manual_seed(0)
    model = create_model("tiny", **CONFIG)
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    loss = model(fixed_inputs()["clips"], generator=torch.Generator().manual_seed(1))["loss"]
    accelerator.backward(loss)
    opt.step()
    save_checkpoint(accelerator, model, run / "checkpoints", step=1, train_state={"step": 1},
                    model_config=model.cfg.to_dict(), keep_last=1)
    return model


@torch.no_grad()
def expected_outputs(model, folder: Path) -> dict[str, torch.Tensor]:
    x = fixed_inputs()
    encoder = load_encoder(folder)
    timm_model = create_timm_model(folder)
    model.eval()
    out = model(x["clips"], generator=torch.Generator().manual_seed(2))
    return {**x, "clip_tokens": encoder.forward_clips(x["clips"]), "frame_tokens": encoder.forward_frames(x["images"]),
            "timm_features": timm_model.forward_features(x["images"]), "loss": out["loss"].reshape(1)}


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    model = write_checkpoint(OUT / "run")
    export_encoder(OUT / "run", OUT / "encoder")
    save_file({k: v.contiguous() for k, v in expected_outputs(model, OUT / "encoder").items()},
              str(OUT / "expected.safetensors"))
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
