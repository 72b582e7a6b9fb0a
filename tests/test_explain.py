"""Tests for jaxmm.evaluation.explain on tiny models trained here on data whose evidence is known.

- Image: the classes differ only by the colour of a square somewhere in the top-right quadrant;
  Grad-CAM of a class-1 prediction must peak there (top-right, so a transposed map would fail).
- Text: demo-like captions in which exactly one word names the class; that word must get the
  largest integrated-gradients attribution, and the attributions must sum to the logit
  difference from the baseline.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxmm import models
from jaxmm.data import tokenizer as tokenizer_lib
from jaxmm.evaluation import explain

SIZE = 128  # the tiny ResNet downsamples 32x: a 4x4 Grad-CAM map, 2x2 cells per quadrant
LENGTH = 16
CLASS_WORDS = (("diaper", "straw"), ("newspaper", "magazine"), ("lettuce", "bread"),
               ("battery", "medication"))
TEMPLATES = ("a {} sitting on top of a table", "a close up of a {} on a table",
             "a {} on a white background", "a picture of a {}")


def key(seed):
    return jax.random.key(seed, impl="rbg")


def model_config(modalities):
    return ml_collections.ConfigDict(dict(
        modalities=modalities, image_arch="tiny", image_pretrained="", text_arch="tiny",
        text_pretrained="", text_pooling="cls", fusion="concat", proj_dim=16, hidden_dim=32,
        dropout=0.0, modality_dropout=0.0, dtype="float32", freeze_image=False,
        freeze_text=False))


def fit(model, variables, batches, steps, lr):
    """Plain Adam on cross-entropy; returns trained {'params', 'batch_stats'}."""
    tx = optax.adam(lr)

    @jax.jit
    def step(variables, opt_state, batch, rng):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, batch["image"], batch["ids"], batch["mask"],
                train=True, mutable=["batch_stats"], rngs={"dropout": rng})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return loss.mean(), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
        change, opt_state = tx.update(grads, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], change),
                "batch_stats": updates.get("batch_stats", {})}, opt_state

    opt_state = tx.init(variables["params"])
    for i in range(steps):
        variables, opt_state = step(variables, opt_state, batches(i), key(100 + i))
    return variables


def square_images(labels, rng):
    """Noise with a square at a random place in the top-right quadrant: blue (0) or red (1)."""
    images = rng.normal(128, 30, (len(labels), SIZE, SIZE, 3)).clip(0, 255).astype(np.uint8)
    half, side = SIZE // 2, SIZE // 5
    for image, label in zip(images, labels, strict=True):
        y, x = rng.integers(0, half - side), rng.integers(half, SIZE - side)
        image[y:y + side, x:x + side] = (220, 30, 30) if label else (30, 30, 220)
    return images


@pytest.fixture(scope="module")
def square_model():
    model = models.build_model(model_config(("image",)), 2, 8, None)
    variables = models.init_variables(model, key(0), SIZE, LENGTH)

    def batches(i):
        rng = np.random.default_rng(i)
        labels = np.arange(8) % 2
        return {"image": square_images(labels, rng), "ids": np.zeros((8, LENGTH), np.int32),
                "mask": np.ones((8, LENGTH), np.int32), "label": labels}

    return model, fit(model, variables, batches, steps=40, lr=3e-3)


@pytest.fixture(scope="module")
def square_explanations(square_model):
    labels = np.ones(8, np.int64)
    images = square_images(labels, np.random.default_rng(1234))
    return explain.Explainer(*square_model).explain(
        images, np.zeros((8, LENGTH), np.int32), np.ones((8, LENGTH), np.int32), labels=labels)


def test_grad_cam_peaks_in_the_quadrant_holding_the_evidence(square_explanations):
    found = square_explanations
    assert [ex.predicted for ex in found] == [1] * 8, "the tiny model did not learn the square"
    for ex in found:
        heat = explain.upsample(ex.heatmap, (SIZE, SIZE))
        quadrants = heat.reshape(2, SIZE // 2, 2, SIZE // 2).mean(axis=(1, 3))
        assert np.unravel_index(np.argmax(quadrants), (2, 2)) == (0, 1), quadrants


def captions(n, rng):
    """Demo-like captions; exactly one word of each names the class."""
    labels = rng.integers(0, len(CLASS_WORDS), n)
    words = [CLASS_WORDS[c][rng.integers(0, 2)] for c in labels]
    texts = [TEMPLATES[rng.integers(0, len(TEMPLATES))].format(w) for w in words]
    return texts, words, labels


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    texts, _, _ = captions(200, np.random.default_rng(0))
    tok = tokenizer_lib.train_wordpiece(texts, 300, str(tmp_path_factory.mktemp("tok")))
    model = models.build_model(model_config(("text",)), len(CLASS_WORDS), len(tok), None)
    variables = models.init_variables(model, key(0), 8, LENGTH)

    def batches(i):
        texts, _, labels = captions(32, np.random.default_rng(i))
        enc = tok(texts, padding="max_length", max_length=LENGTH, truncation=True,
                  return_tensors="np")
        return {"image": np.zeros((32, 8, 8, 3), np.uint8), "ids": enc["input_ids"],
                "mask": enc["attention_mask"], "label": labels}

    return model, fit(model, variables, batches, steps=80, lr=3e-3), tok


@pytest.fixture(scope="module")
def text_explanations(text_model):
    model, variables, tok = text_model
    texts, words, labels = captions(8, np.random.default_rng(999))
    enc = tok(texts, padding="max_length", max_length=LENGTH, truncation=True,
              return_tensors="np")
    found = explain.Explainer(model, variables, tok).explain(
        np.zeros((8, 8, 8, 3), np.uint8), enc["input_ids"], enc["attention_mask"],
        labels=labels, texts=texts)
    return found, words, labels


def test_class_word_gets_the_largest_attribution(text_explanations):
    found, words, labels = text_explanations
    assert [ex.predicted for ex in found] == list(labels), "the tiny model did not learn"
    for ex, word in zip(found, words, strict=True):
        assert word in ex.tokens, f"{word!r} should be a single token: {ex.tokens}"
        assert ex.tokens[int(np.argmax(ex.attributions))] == word, list(
            zip(ex.tokens, ex.attributions.round(3), strict=True))


def test_attributions_sum_to_the_logit_difference(text_model, text_explanations):
    model, variables, tok = text_model
    found, _, _ = text_explanations
    texts, _, _ = captions(8, np.random.default_rng(999))  # the fixture's captions
    enc = tok(texts, padding="max_length", max_length=LENGTH, truncation=True,
              return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # The documented baseline, built here: every real token but [CLS]/[SEP] becomes [PAD].
    keep = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (mask == 0)
    baseline = np.where(keep, ids, tok.pad_token_id)
    logits = lambda x: np.asarray(model.apply(variables, np.zeros((8, 8, 8, 3), np.uint8), x,
                                              mask, train=False))
    at_input, at_baseline = logits(ids), logits(baseline)
    for i, ex in enumerate(found):
        difference = at_input[i, ex.predicted] - at_baseline[i, ex.predicted]
        assert abs(ex.attributions.sum() - difference) <= 0.05 * abs(difference), (
            ex.attributions.sum(), difference)
        assert ex.ig_gap < 0.05
        # [CLS] and [SEP] are kept in the baseline, so they cannot be credited.
        assert ex.tokens[0] == "[CLS]" and ex.tokens[-1] == "[SEP]"
        assert ex.attributions[0] == 0.0 and ex.attributions[-1] == 0.0


def test_two_tower_probabilities_follow_the_modality_mask():
    model = models.build_model(model_config(("image", "text")), 3, 40, None)
    variables = models.init_variables(model, key(1), 32, 8)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    ids = rng.integers(5, 40, (2, 8)).astype(np.int32)
    mask = np.ones((2, 8), np.int32)
    probs = explain.Explainer(model, variables, temperature=2.0).probabilities(image, ids, mask)
    assert list(probs) == ["image+text", "image", "text"]
    apply = jax.jit(lambda keep: model.apply(variables, image, ids, mask, train=False,
                                             modality_mask=jnp.tile(keep, (2, 1))))
    for keep, name in (([1, 1], "image+text"), ([1, 0], "image"), ([0, 1], "text")):
        expected = jax.nn.softmax(apply(np.array(keep, bool)) / 2.0)
        np.testing.assert_allclose(probs[name], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(probs["image"], probs["text"])


def test_figures_for_every_kind_of_model(tmp_path, square_explanations, text_explanations):
    rng = np.random.default_rng(0)
    both = explain.Explanation(  # what a two-tower model gives: a heatmap, tokens, three bars
        image=rng.integers(0, 256, (40, 40, 3), np.uint8), text="a plastic bottle",
        tokens=["[CLS]", "a", "plastic", "bottle", "[SEP]"],
        heatmap=rng.random((2, 2)), attributions=np.array([0.0, 0.1, -0.4, 1.2, 0.0]),
        ig_gap=0.01, probs={"image+text": np.array([0.2, 0.8]), "image": np.array([0.6, 0.4]),
                            "text": np.array([0.1, 0.9])},
        predicted=1, label=0, name="bottle_3.png")
    cases = [(both, ["paper", "plastic"]), (square_explanations[0], ["blue", "red"]),
             (text_explanations[0][0], ["a", "b", "c", "d"])]
    for i, (ex, names) in enumerate(cases):
        path = explain.render(ex, names, str(tmp_path / f"{i}.png"))
        assert open(path, "rb").read(4) == b"\x89PNG"
    path = explain.render_gallery([both] * 5, ["paper", "plastic"], str(tmp_path / "g.png"))
    assert open(path, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="class names"):
        explain.render(both, ["x", "y", "z"], str(tmp_path / "bad.png"))
