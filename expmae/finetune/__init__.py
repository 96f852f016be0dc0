"""Downstream evaluation of a pretrained encoder on any labelled face-video set: ``expmae-finetune``.

    expmae-finetune --labels train-label.csv --features audio=feats/hubert visual=feats/expmae --out runs/mer

Feature folders or face clips (``--videos`` with ``--encoder``, end to end) -> folds -> a head per fold -> scores
and predictions. Commands and outputs: docs/guides/finetuning.md; the package's modules, in import order (nothing
here imports the CLI or the protocol back): docs/architecture.md ("Inside the packages").
"""


def main(argv=None) -> int:
    """``expmae-finetune``: the target of console scripts installed with the entry point ``expmae.finetune:main``."""
    from expmae.finetune.cli import main as cli_main  # deferred: upward shim: scripts installed with this entry point

    return cli_main(argv)
