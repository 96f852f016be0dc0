"""Which module may import which: expmae's import layers, lowest first (tests/test_import_layers.py enforces them).

A module imports from its own layer or lower ones, never from a higher one and never in a circle; the CLI layer
(argument parsing, printing, exit codes) is imported by nothing but console-script shims. Torch-free.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

# (layer, what it holds, module patterns): the first pattern that matches a module places it.
LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("base", "version, atomic files, jobs and their shards, run folders, the settings mechanism, shipped configs",
     ("expmae", "expmae.architecture", "expmae.files", "expmae.jobs", "expmae.parentdeath", "expmae.runlock",
      "expmae.settings", "expmae.shards", "expmae.shipped_configs")),
    ("config", "every setting, declared once, torch-free",
     ("expmae.model_config", "expmae.config", "expmae.finetune.config")),
    ("blocks", "torch building blocks, media reading, face detection and tracking",
     ("expmae.pos_embed", "expmae.vit", "expmae.video", "expmae.optim", "expmae.flops", "expmae.nuisance",
      "expmae.recon_baselines", "expmae.facetrack")),
    ("model", "the model, probes, synthetic data",
     ("expmae.model", "expmae.probe", "expmae.synthetic")),
    ("io", "weights in and out, checkpoints, clips and label files",
     ("expmae.checkpoint", "expmae.weights", "expmae.weights.*", "expmae.data", "expmae.data_*", "expmae.labels")),
    ("capabilities", "features, finetuning, pretraining, visualisation, benchmarks, face cropping",
     ("expmae.features", "expmae.features.*", "expmae.facecrop_*",
      "expmae.finetune", "expmae.finetune.*", "expmae.pretrain", "expmae.pretrain.*", "expmae.visualize",
      "expmae.benchmark", "expmae.learning_benchmark", "expmae.supervised_reference")),
    ("cli", "console scripts: parse, run, print",
     ("expmae.export", "expmae.demo", "expmae.facecrop", "expmae.*.cli", "expmae.*.__main__")),
)
CLI_MODULES = LAYERS[-1][2]

# Deferred imports that go up a layer on purpose (importer, imported): each is a lazy public-API shim.
ALLOWED_UPWARD = {
    ("expmae", "expmae.weights"): "expmae.load_encoder, resolved on first use so `import expmae` stays torch-free",
    ("expmae.finetune", "expmae.finetune.cli"): "expmae.finetune.main, the entry point of scripts installed before "
                                                "it moved to expmae.finetune.cli:main",
}


def is_cli(module: str) -> bool:
    return any(fnmatchcase(module, p) for p in CLI_MODULES)


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``."""
    if is_cli(module):  # before the library patterns, which match expmae.finetune.cli too
        return len(LAYERS) - 1
    for i, (_, _, patterns) in enumerate(LAYERS):
        if any(fnmatchcase(module, p) for p in patterns):
            return i
    raise KeyError(f"{module}: in no layer of expmae.architecture.LAYERS (add it where it belongs)")
