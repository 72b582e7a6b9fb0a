"""Tokenizers: any Hugging Face tokenizer directory, or a small WordPiece trained on train texts.

The real runs use DistilBERT's tokenizer (a directory or a cached hub id in config.tokenizer).
Demos and tests have no network, so with ``config.tokenizer == ''`` a lower-casing WordPiece
tokenizer with DistilBERT's special tokens is built from the training texts once and saved as a
fast-tokenizer directory (``<dataset dir>/tokenizer``) that ``AutoTokenizer`` loads.

Its vocabulary is a pure function of the texts and the size (``build_vocab``): the special
tokens, then every character and its ``##`` continuation form, then whole words by descending
count (ties alphabetical). The ``tokenizers`` trainer is not used: its merges depend on hash-map
order, so two processes gave different vocabularies (and different models) for the same texts.
"""

import collections
import os

import transformers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from jaxmm.errors import TokenizerError

# DistilBERT's special tokens; [PAD] first so that its id is 0 as in the real vocabulary.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_SUBDIR = "tokenizer"


def _by_count(counter: collections.Counter) -> list[str]:
    """Keys by descending count, ties in alphabetical (code point) order."""
    return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def build_vocab(texts, vocab_size: int) -> list[str]:
    """The WordPiece vocabulary for some texts: a pure function of the texts and the size.

    Args:
      texts: iterable of training strings (lower-cased and split like the tokenizer does).
      vocab_size: largest vocabulary size (special tokens included).

    Returns:
      Special tokens, then characters, then their ``##`` forms (both by descending count),
      then words of two or more characters by descending count; ties alphabetical; cut at
      vocab_size. Every character seen can be encoded, so only unseen characters become [UNK].
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = collections.Counter(
        w for text in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = collections.Counter()
    for w, n in words.items():
        for ch in w:
            chars[ch] += n
    char_list = _by_count(chars)
    vocab = [*SPECIAL_TOKENS, *char_list, *(f"##{c}" for c in char_list)]
    vocab += [w for w in _by_count(words) if len(w) > 1 and w not in SPECIAL_TOKENS]
    return vocab[:vocab_size]


def train_wordpiece(texts, vocab_size: int, out_dir: str):
    """Builds a DistilBERT-compatible WordPiece tokenizer from texts and saves it.

    Args:
      texts: iterable of training strings.
      vocab_size: largest vocabulary size (special tokens included).
      out_dir: directory to write (tokenizer.json, vocab.txt, tokenizer_config.json, ...); the
        files are byte-identical for equal texts and size, in any process.

    Returns:
      The loaded `transformers.PreTrainedTokenizerFast`.
    """
    vocab = build_vocab(texts, vocab_size)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
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
