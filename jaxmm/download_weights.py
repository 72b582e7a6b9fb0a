"""Pre-downloads the pretrained towers and tokenizer on a machine with internet access.

    python -m jaxmm.download_weights --out DIR [--image_model ID] [--text_model ID]

writes DIR/resnet50 (HF-format ResNet weights + config.json) and DIR/distilbert (DistilBERT
weights, config.json and tokenizer files). Then set config.model.image_pretrained=DIR/resnet50,
config.model.text_pretrained=DIR/distilbert and config.tokenizer=DIR/distilbert. A
torchvision-format checkpoint such as timm/resnet50.tv_in1k can be fetched with --image_model.
Without network access it says so in one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxmm import cli
from jaxmm.errors import HubUnreachableError, PretrainedFormatError

# One weight file is enough; safetensors first because it loads without torch or TF.
WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack")
SIDE_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def select_files(repo_files: list[str]) -> list[str]:
    """Picks the files to fetch from a hub repository listing.

    Raises:
      PretrainedFormatError: when the repository has no loadable single-file weights.
    """
    weights = [name for name in WEIGHT_FILES if name in repo_files]
    if not weights:
        raise PretrainedFormatError(f"no {' or '.join(WEIGHT_FILES)} in the repository (found "
                         f"{sorted(repo_files)[:10]})")
    return [weights[0], *(name for name in SIDE_FILES if name in repo_files)]


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub cannot be reached" (offline mode included)."""
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError

    return (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout, LocalEntryNotFoundError)


def fetch(repo_id: str, out_dir: str, revision: str | None = None) -> list[str]:
    """Downloads the selected files of ``repo_id`` into ``out_dir``; returns their names.

    Raises:
      HubUnreachableError: no network (or HF_HUB_OFFLINE=1); says where to run this instead.
      PretrainedFormatError: the repository has no single-file safetensors/msgpack weights.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = select_files(HfApi().list_repo_files(repo_id, revision=revision))
        snapshot_download(repo_id, revision=revision, local_dir=out_dir, allow_patterns=files)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise PretrainedFormatError(f"hub repository {repo_id!r} (revision {revision}): "
                                    f"{type(e).__name__}") from None
    except _network_errors() as e:
        raise HubUnreachableError(
            f"cannot reach the Hugging Face hub for {repo_id!r} ({type(e).__name__}); run "
            "`python -m jaxmm.download_weights --out DIR` on a machine with internet access "
            "(e.g. a login node) and copy DIR here") from None
    return files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image_model", default="microsoft/resnet-50",
                        help="hub id of the ResNet-50 (HF or torchvision/timm format)")
    parser.add_argument("--text_model", default="distilbert-base-uncased",
                        help="hub id of the DistilBERT model and tokenizer")
    parser.add_argument("--revision", default=None, help="hub revision for both repositories")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Fetches both towers and the tokenizer (``cli.run_argparse``'s exit codes)."""
    return cli.run_argparse(lambda a: _download(parse_args(a)), "jaxmm.download_weights", argv)


def _download(args: argparse.Namespace) -> None:
    """Fetches both towers, checks that they load, and prints the config lines to use."""
    from jaxmm.models import pretrained

    image_dir = os.path.join(args.out, "resnet50")
    text_dir = os.path.join(args.out, "distilbert")
    print(f"{args.image_model} -> {image_dir}: {fetch(args.image_model, image_dir, args.revision)}")
    print(f"{args.text_model} -> {text_dir}: {fetch(args.text_model, text_dir, args.revision)}")
    print(f"image tower: {len(pretrained.read_image_state(image_dir))} tensors readable")
    print(f"text tower: {len(pretrained.read_text_state(text_dir)[0])} modules readable")
    from transformers import AutoTokenizer

    print(f"tokenizer: vocabulary of {len(AutoTokenizer.from_pretrained(text_dir))}")
    print("Use:\n"
          f"  --config.model.image_pretrained={image_dir}\n"
          f"  --config.model.text_pretrained={text_dir}\n"
          f"  --config.tokenizer={text_dir}")


if __name__ == "__main__":
    sys.exit(main())
