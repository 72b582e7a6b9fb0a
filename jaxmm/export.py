"""Exports a trained run as a self-contained bundle folder.

    python -m jaxmm.export --workdir runs/x [--checkpoint best|latest|STEP] --out bundle/
        [--explain]      # + explanation functions, for python -m jaxmm.serve

The bundle holds model.json (architecture, classes, preprocessing, calibration, versions),
weights.safetensors, the tokenizer and a serialized jax.export function (StableHLO for CPU and
CUDA), so it runs where only the bundle is: ``python -m jaxmm.predict --model bundle/ PHOTO``
or ``jaxmm.Classifier.load("bundle/")``.
"""

import os

from absl import flags

from jaxmm import cli
from jaxmm.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds config.json).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
_OUT = flags.DEFINE_string("out", None, "Bundle folder to write (replaced if it is a bundle).")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"],
                               "Platforms the inference function is lowered for.")
_EXPLAIN = flags.DEFINE_bool("explain", False,
                             "Add the explanation functions (Grad-CAM, token attributions, "
                             "image-alone/text-alone probabilities) that jaxmm.serve uses.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    from jaxmm.trained import bundle

    spec = bundle.export_run(_WORKDIR.value, _OUT.value, _CHECKPOINT.value,
                             tuple(_PLATFORMS.value), explain=_EXPLAIN.value)
    weights = spec["weights"]
    print(f"bundle {spec['model_id']} written to {os.path.abspath(_OUT.value)}: "
          f"{len(spec['model']['class_names'])} classes, "
          f"{weights['values']:,} weights in {weights['count']} tensors, step "
          f"{spec['source']['step']} ({spec['source']['checkpoint']}), function for "
          f"{', '.join(spec['function']['platforms'])}"
          + (", with explanation functions" if spec["extensions"].get("explain") else ""))


def run():
    """Console-script entry point (``jaxmm-export``)."""
    cli.run(main, "jaxmm.export")


if __name__ == "__main__":
    run()
