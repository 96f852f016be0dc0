"""Heads: several (B, D_m) embeddings in, class logits + regression columns out. One file per head; a new head is
a file plus an entry in :data:`HEADS`.

- ``attention`` (MER2023 baseline), ``mfb`` (factorized bilinear pooling), ``concat`` (early fusion),
  ``transformer`` (branches as tokens, ``num_layers`` layers), ``attentive`` (a learned query cross-attending
  the branches' tokens, V-JEPA's attentive probe; end to end it reads the encoder's tokens, not their mean):
  torch modules trained by gradient steps;
- ``svm``: scikit-learn's SVC on the concatenated features (``trainable = False``: fit once, no regression).

A head spec names a head and, for ``transformer``, its depth: ``transformer:6``.
"""
from __future__ import annotations

from typing import Callable, Mapping

from expmae.finetune.heads.attention import AttentionFusion
from expmae.finetune.heads.attentive import AttentiveFusion
from expmae.finetune.heads.base import FusionHead, Standardize, mlp_encoder, task_loss
from expmae.finetune.heads.concat import ConcatFusion
from expmae.finetune.heads.mfb import FactorizedBilinearPooling
from expmae.finetune.heads.svm import SVMHead
from expmae.finetune.heads.transformer import TransformerFusion

__all__ = ["HEADS", "AttentionFusion", "AttentiveFusion", "ConcatFusion", "FactorizedBilinearPooling", "FusionHead",
           "SVMHead", "Standardize", "TOKEN_HEADS", "TransformerFusion", "create_head", "is_trainable", "mlp_encoder",
           "parse_head_spec", "task_loss"]

# name -> builder(in_dims, options); options: hidden_dim, dropout, factor_k, num_layers, svm_c, num_classes, num_targets
HEADS: dict[str, Callable] = {
    "attention": lambda dims, o: AttentionFusion(dims, hidden_dim=o["hidden_dim"], dropout=o["dropout"],
                                                 num_classes=o["num_classes"], num_targets=o["num_targets"]),
    "mfb": lambda dims, o: FactorizedBilinearPooling(dims, factor_k=o["factor_k"], out_dim=o["hidden_dim"],
                                                     dropout=o["dropout"], num_classes=o["num_classes"],
                                                     num_targets=o["num_targets"]),
    "concat": lambda dims, o: ConcatFusion(dims, hidden_dim=o["hidden_dim"], dropout=o["dropout"],
                                           num_classes=o["num_classes"], num_targets=o["num_targets"]),
    "transformer": lambda dims, o: TransformerFusion(dims, hidden_dim=o["hidden_dim"], dropout=o["dropout"],
                                                     num_layers=o["num_layers"], num_classes=o["num_classes"],
                                                     num_targets=o["num_targets"]),
    "attentive": lambda dims, o: AttentiveFusion(dims, hidden_dim=o["hidden_dim"], dropout=o["dropout"],
                                                 num_classes=o["num_classes"], num_targets=o["num_targets"]),
    "svm": lambda dims, o: SVMHead(dims, c=o["svm_c"], num_classes=o["num_classes"], num_targets=o["num_targets"]),
}


# heads that read a branch's tokens (B, N, D) (token_inputs): frame-level feature files are kept frame level for them
TOKEN_HEADS = ("attentive",)


def create_head(name: str, in_dims: Mapping[str, int], *, hidden_dim: int = 128, dropout: float = 0.3,
                factor_k: int = 5, num_layers: int = 3, svm_c: float = 1.0, num_classes: int = 6, num_targets: int = 1):
    """Build a head by name (:data:`HEADS`); ``hidden_dim`` is MFB's output size o, ``num_layers`` the
    transformer's depth, ``svm_c`` the SVM's C; ``num_targets`` regression columns."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of {sorted(HEADS)}")
    options = dict(hidden_dim=hidden_dim, dropout=dropout, factor_k=factor_k, num_layers=num_layers, svm_c=svm_c,
                   num_classes=num_classes, num_targets=num_targets)
    return HEADS[name](in_dims, options)


def is_trainable(head) -> bool:
    """A torch head (gradient steps, epochs) rather than a scikit-learn one."""
    return getattr(head, "trainable", True)


def parse_head_spec(spec: str) -> tuple[str, int | None]:
    """``"transformer:6"`` -> ("transformer", 6); ``"mfb"`` -> ("mfb", None)."""
    name, sep, layers = spec.strip().partition(":")
    if name not in HEADS:
        raise ValueError(f"head {spec!r}: unknown head {name!r}; expected one of {sorted(HEADS)} (transformer:LAYERS)")
    if not sep:
        return name, None
    if name != "transformer" or not layers.isdigit() or int(layers) < 1:
        raise ValueError(f"head {spec!r}: only transformer takes a depth, as transformer:LAYERS with LAYERS >= 1")
    return name, int(layers)
