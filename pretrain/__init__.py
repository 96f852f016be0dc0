"""expMAE pretraining entry points: `accelerate launch pretrain/train.py` and `python -m pretrain.demo`."""
