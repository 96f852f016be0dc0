"""Weights in and out of expMAE.

In: foreign checkpoints are read (load.py), their layout detected and converted by one small converter per
layout (convert.py dispatches to mae.py: facebookresearch/mae and timm ViTs; videomae.py: VideoMAE and
VideoMAE V2; hf_import.py: transformers VideoMAE* / ViTMAE*; convert.convert_expmae: expMAE's own), then fitted to the
model (the encoder strictly, the position code and class token checked, decoders when their shapes match).
Out: the expmae encoder folder with a timm frame encoder (folder.py), transformers VideoMAE (the clip encoder) and
ViTMAE (the frame encoder) folders (hf_export.py).
"""
from expmae.weights.folder import (CONFIG_NAME, ENCODER_WEIGHTS, TIMM_WEIGHTS, create_timm_model, load_encoder,
                                   read_encoder_config, save_encoder, unwrap_encoder, verify_encoder_folder)
from expmae.weights.convert import convert, detect_layout
from expmae.weights.layouts import ImportReport, fit
from expmae.weights.load import (convert_state_dict, import_encoder, init_from, is_weights_source,
                                 load_pretrained_weights, read_source)

__all__ = ["CONFIG_NAME", "ENCODER_WEIGHTS", "TIMM_WEIGHTS", "ImportReport", "convert", "convert_state_dict", "create_timm_model",
           "detect_layout", "fit", "import_encoder", "init_from", "is_weights_source", "load_encoder",
           "load_pretrained_weights", "read_encoder_config", "read_source", "save_encoder", "unwrap_encoder",
           "verify_encoder_folder"]
