"""Downstream evaluation of a pretrained encoder on any labelled face-video set: ``expmae-finetune``.

    expmae-finetune --labels train-label.csv --features audio=feats/hubert text=feats/macbert visual=feats/expmae \
        --test test3-label.csv --head attention --out runs/mer                      # MER2023, 5 stratified folds
    expmae-finetune --labels dfew.csv --split-column fold --features visual=feats/expmae --out runs/dfew   # UAR / WAR
    expmae-finetune --labels train-label.csv --videos faces/ --encoder encoders/expmae-base --out runs/e2e

The parts, each importing only those listed before it (nothing here imports the CLI or the protocol back):

- ``common``       digest, JSON, log lines
- ``config``       FinetuneConfig (every setting, once) and its YAML reader
- (label CSVs: ``expmae.labels``, shared with the pretraining data)
- ``featureset``   feature folders -> FeatureSet (the fusion branches)
- ``splits``       folds: stratified k-fold, a split column, split files / official train-test lists
- ``metrics``      WAR, UAR, F1s, per-class recall, MSE / CCC, MER2023's metric; ``Scorer`` (report + select)
- ``heads``        attention, mfb, concat, transformer, svm (one file each) and the registry
- ``pseudo_label`` MER-SEMI pseudo-labelling rounds
- ``training``     the epoch loop, the head trainer, prediction
- ``backends``     ``features`` (feature folders) and ``video`` (the encoder finetuned end to end)
- ``protocol``     folds -> fold models -> predictions -> results.json (``run_finetune``)
- ``compare``      ``--compare``: several heads on the same folds, one table
- ``cli``          the command line (``main``)
"""


def main(argv=None) -> int:
    """``expmae-finetune``: the target of console scripts installed with the entry point ``expmae.finetune:main``."""
    from expmae.finetune.cli import main as cli_main  # deferred: upward shim: scripts installed with this entry point

    return cli_main(argv)
