"""Tests of the tokenizer loader and the demo WordPiece tokenizer."""

import os

import pytest
import transformers
from ml_collections import ConfigDict

from jaxmm.data import prepared
from jaxmm.data import tokenizer as tokenizer_lib
from tests.support import demo_dataset


def test_trained_wordpiece_is_distilbert_compatible(tmp_path):
    tok = tokenizer_lib.train_wordpiece(["Plastic bottle", "banana peel", "plastic spoon"] * 5,
                                        100, str(tmp_path / "tok"))
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    slow_compatible = transformers.DistilBertTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    for t in (tok, slow_compatible):
        assert t.pad_token_id == 0
        assert [t.cls_token, t.sep_token, t.unk_token, t.mask_token] == [
            "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
        enc = t(["PLASTIC Bottle", "zzz"], padding="max_length", max_length=6)
        assert enc["input_ids"][0][0] == t.cls_token_id
        assert t.convert_ids_to_tokens(enc["input_ids"][0][1:3]) == ["plastic", "bottle"]
        assert enc["attention_mask"][0] == [1, 1, 1, 1, 0, 0]


def test_get_tokenizer_trains_once_then_loads():
    _, ds_dir = demo_dataset()
    config = ConfigDict(dict(tokenizer="", tokenizer_vocab_size=300))
    tok = prepared.get_tokenizer(config, ds_dir)
    path = os.path.join(ds_dir, "tokenizer", "tokenizer.json")
    mtime = os.path.getmtime(path)
    again = prepared.get_tokenizer(config, ds_dir)
    assert os.path.getmtime(path) == mtime and again.get_vocab() == tok.get_vocab()
    config.tokenizer = os.path.join(ds_dir, "tokenizer")
    assert prepared.get_tokenizer(config, ds_dir).get_vocab() == tok.get_vocab()


def test_offline_uncached_hub_id_is_one_clear_line():
    config = ConfigDict(dict(tokenizer="someone/not-cached-tokenizer-xyz"))
    with pytest.raises(tokenizer_lib.TokenizerError) as err:
        prepared.get_tokenizer(config, "")
    msg = str(err.value)
    assert "\n" not in msg and "download_weights" in msg and "config.tokenizer" in msg


def test_vocabulary_order_is_a_pure_function_of_texts_and_size():
    texts = ["Plastic bottle", "plastic SPOON", "banana peel", "bottle", "zz"]
    vocab = tokenizer_lib.build_vocab(texts, 1000)
    chars = ["t", "a", "l", "e", "o", "p", "b", "n", "s", "c", "i", "z"]  # by count, then a-z
    words = ["bottle", "plastic", "banana", "peel", "spoon", "zz"]  # by count, then a-z
    assert vocab == [*tokenizer_lib.SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars), *words]
    assert tokenizer_lib.build_vocab(list(reversed(texts)), 20) == vocab[:20]


_BUILD = """
import sys
from jaxmm.data import captions, synthetic, tokenizer
texts = [captions.text_from_filename(p[2]) + " " + p[3] for p in synthetic._plan(60, 0, 64)]
tokenizer.train_wordpiece(texts, 300, sys.argv[1])
"""


def test_two_processes_write_byte_identical_tokenizers(tmp_path):
    import subprocess
    import sys

    for name, seed in (("a", "1"), ("b", "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / name)], check=True,
                       env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and "tokenizer.json" in names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
