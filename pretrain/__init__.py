"""Thin entry points for people working in a clone: `accelerate launch pretrain/train.py` and
`python -m pretrain.demo`. The implementation lives in the library: expmae.pretrain and expmae.demo;
the configs in ``configs/`` are the package's own (a link to expmae/pretrain/configs)."""
