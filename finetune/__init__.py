"""Finetuning entry points (MER2023 fusion protocol). The logic lives in :mod:`expmae.finetune`."""
