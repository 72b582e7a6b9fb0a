"""Tokenizers: any Hugging Face tokenizer directory, or a small WordPiece trained on train texts.

The real runs use DistilBERT's tokenizer (a directory or a cached hub id in config.tokenizer).
Demos and tests have no network, so with ``config.tokenizer == ''`` a lower-casing WordPiece
tokenizer with DistilBERT's special tokens is trained on the training texts once and saved as a
fast-tokenizer directory (``<dataset dir>/tokenizer``) that ``AutoTokenizer`` loads.
"""

import os
import shutil

import transformers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# DistilBERT's special tokens; [PAD] first so that its id is 0 as in the real vocabulary.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_SUBDIR = "tokenizer"


class TokenizerError(OSError):
    """A tokenizer that cannot be loaded; the message says what to do."""


def train_wordpiece(texts, vocab_size: int, out_dir: str):
    """Trains a DistilBERT-compatible WordPiece tokenizer and saves it.

    Args:
      texts: iterable of training strings.
      vocab_size: target vocabulary size (special tokens included).
      out_dir: directory to write (tokenizer.json, vocab.txt, tokenizer_config.json, ...).

    Returns:
      The loaded `transformers.PreTrainedTokenizerFast`.
    """
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = transformers.DistilBertTokenizerFast(
        tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    fast.save_pretrained(out_dir)
    return transformers.AutoTokenizer.from_pretrained(out_dir)


def load_tokenizer(name_or_dir: str):
    """Loads a tokenizer directory or a cached hub id.

    Args:
      name_or_dir: a local directory or a Hugging Face hub id.

    Returns:
      A fast tokenizer.

    Raises:
      TokenizerError: not a directory and not in the local cache (offline or not downloaded).
    """
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_dir, use_fast=True)
    except (OSError, ValueError) as e:
        if os.path.isdir(name_or_dir):
            raise TokenizerError(f"cannot load tokenizer from {name_or_dir}: "
                                 f"{str(e).splitlines()[0]}") from None
        raise TokenizerError(
            f"tokenizer {name_or_dir!r} is neither a local directory nor a hub id in the local "
            "Hugging Face cache; on a machine with internet run `python -m "
            "jaxmm.download_weights --out weights` (it saves the tokenizer with the DistilBERT "
            "weights in weights/distilbert) and set --config.tokenizer to that folder") from None


def _train_texts(dataset_dir: str) -> list[str]:
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(dataset_dir).as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()})
    return [r["text"].decode("utf-8") for r in source.__getitems__(list(range(len(source))))]


def get_tokenizer(config, dataset_dir: str):
    """The configured tokenizer, or the WordPiece one trained on this dataset's train texts.

    Args:
      config: ConfigDict with ``tokenizer`` ('' = train/load WordPiece) and
        ``tokenizer_vocab_size``.
      dataset_dir: prepared TFDS dataset directory.

    Returns:
      A `transformers.PreTrainedTokenizerFast`.
    """
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    out_dir = os.path.join(dataset_dir, TOKENIZER_SUBDIR)
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return load_tokenizer(out_dir)
    # Write to a private folder and rename, so a concurrent reader never sees half a tokenizer.
    tmp = f"{out_dir}.tmp{os.getpid()}"
    train_wordpiece(_train_texts(dataset_dir), config.get("tokenizer_vocab_size", 1000), tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race; its tokenizer is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out_dir)
