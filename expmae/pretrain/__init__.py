"""expMAE pretraining: the training loop and its shipped configs (``accelerate launch -m expmae.pretrain``).

    accelerate launch --config_file "$(expmae-configs path deepspeed_zero2)" -m expmae.pretrain \\
        --config vit_base_16x224 data.source=/data/face_crops [--resume auto]

``--config`` takes a shipped config's name (``expmae-configs`` lists them) or a path to a YAML file.
"""
