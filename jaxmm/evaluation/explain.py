"""Why the model predicted what it did: Grad-CAM, integrated gradients and per-tower probabilities.

- Grad-CAM (Selvaraju et al., 2017) of the predicted class over the image tower's last
  convolutional stage: the stage's channels weighted by their spatially averaged gradients,
  summed and rectified. The ResNet exposes that stage through flax's ``sow``/``perturb`` hooks.
- Integrated gradients (Sundararajan et al., 2017) of the predicted class's logit with respect
  to the token (word) embeddings, from a baseline where every real token except [CLS]/[SEP]
  is replaced by the padding token's embedding. Each token's attribution is the dot product of
  its embedding difference with the path-averaged gradient (trapezoid rule); the attributions
  sum to logit(input) - logit(baseline) up to the integration error, reported as ``ig_gap``.
- Class probabilities with the image only, the text only and both, through the model's
  ``modality_mask`` (meaningful when it was trained with modality dropout).

``render`` draws one example (photo with heatmap, shaded tokens, probability bars) and
``render_gallery`` a grid of them, on Agg figures without pyplot state.
"""

import dataclasses
import functools
import os
import re
import textwrap

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxmm import paths
from jaxmm.evaluation import calibration
from jaxmm.evaluation.heatmap import heat_rgba, upsample  # noqa: F401 -- upsample: public name
from jaxmm.models.resnet import LAST_STAGE
from jaxmm.trained.model import padded_batches

IG_STEPS = 64  # trapezoid intervals of the integrated-gradients path


@dataclasses.dataclass
class Explanation:
    """Everything the figures show for one example (NumPy, host side)."""

    image: np.ndarray  # uint8 [H,W,3]: what the model saw
    text: str
    tokens: list[str]  # the real tokens (attention mask 1), [CLS]/[SEP] included
    heatmap: np.ndarray | None  # Grad-CAM [h,w] in [0,1]; None without an image tower
    attributions: np.ndarray | None  # [len(tokens)]; None without a text tower
    ig_gap: float | None  # |sum(attributions) - logit difference| / |logit difference|
    probs: dict[str, np.ndarray]  # 'image+text' / 'image' / 'text' -> [K] probabilities
    predicted: int
    label: int | None = None
    name: str = ""  # file name or other identifier for titles


def grad_cam(model, variables, image, input_ids, attention_mask):
    """Grad-CAM maps of each example's predicted class.

    Args:
      model: a ``MultimodalClassifier`` with an image tower.
      variables: {'params', 'batch_stats'}.
      image, input_ids, attention_mask: one batch, as for ``model.apply``.

    Returns:
      (cams [B,h,w] float32 in [0,1] (all zero when no location raises the logit), logits [B,K]).
    """
    def forward(perturbations):
        logits, state = model.apply({**variables, "perturbations": perturbations}, image,
                                    input_ids, attention_mask, train=False,
                                    mutable=["intermediates"])
        return logits, state["intermediates"]["image"][LAST_STAGE][0]

    # The perturbation (zeros added to the stage's output) has the stage's shape.
    shape = jax.eval_shape(lambda: model.apply(
        variables, image, input_ids, attention_mask, train=False,
        mutable=["perturbations"])[1]["perturbations"])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    logits, vjp, acts = jax.vjp(forward, zeros, has_aux=True)
    target = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=logits.dtype)
    grads = vjp(target)[0]["image"][LAST_STAGE].astype(jnp.float32)
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)
    cam = jax.nn.relu(jnp.sum(weights * acts.astype(jnp.float32), axis=-1))
    cam = cam / jnp.maximum(jnp.max(cam, axis=(1, 2), keepdims=True), 1e-12)
    return cam, logits


def baseline_ids(input_ids, attention_mask, pad_id: int, keep_ids) -> np.ndarray:
    """The IG baseline: real tokens become ``pad_id`` except those in ``keep_ids``."""
    input_ids = np.asarray(input_ids)
    keep = np.isin(input_ids, list(keep_ids)) | (np.asarray(attention_mask) == 0)
    return np.where(keep, input_ids, pad_id).astype(input_ids.dtype)


def integrated_gradients(model, variables, image, input_ids, attention_mask, baseline,
                         target, steps: int = IG_STEPS):
    """Integrated gradients of ``target``'s logit over the word embeddings of ONE example.

    Args:
      model: a ``MultimodalClassifier`` with a text tower.
      variables: {'params', 'batch_stats'}.
      image, input_ids, attention_mask: a batch of one; the image is held fixed.
      baseline: int [1,L] ids whose embeddings start the path (``baseline_ids``).
      target: class index.
      steps: trapezoid intervals; the model runs once on a batch of steps + 1 points.

    Returns:
      (attributions [L] (zero where input and baseline agree), logit at the input, logit at
      the baseline).
    """
    table = variables["params"]["text"]["embeddings"]["word_embeddings"]["embedding"]
    x, x0 = table[input_ids[0]], table[baseline[0]]
    alphas = jnp.linspace(0.0, 1.0, steps + 1)
    path = x0[None] + alphas[:, None, None] * (x - x0)[None]
    tile = lambda a: jnp.broadcast_to(a, (steps + 1, *a.shape[1:]))

    def logit(embeddings):
        logits = model.apply(variables, tile(image), tile(input_ids), tile(attention_mask),
                             train=False, word_embeddings=embeddings)
        return logits[:, target]

    values, vjp = jax.vjp(logit, path)
    grads = vjp(jnp.ones_like(values))[0]
    weights = jnp.full((steps + 1,), 1.0 / steps).at[jnp.array([0, steps])].set(0.5 / steps)
    mean_grad = jnp.tensordot(weights, grads, axes=1)
    return jnp.sum((x - x0) * mean_grad, axis=-1), values[-1], values[0]


def modality_masks(modalities) -> dict[str, np.ndarray]:
    """Named tower masks for the model's modalities: both (when two), then each alone."""
    masks = {"+".join(modalities): np.ones(len(modalities), bool)}
    if len(modalities) > 1:
        for i, m in enumerate(modalities):
            masks[m] = np.arange(len(modalities)) == i
    return masks


class Explainer:
    """Explains a model's predictions batch by batch (compiled once per batch shape).

    Args:
      model: a ``MultimodalClassifier``.
      variables: {'params', 'batch_stats'} (host or device arrays).
      tokenizer: the run's tokenizer (pad token, special ids, id -> token); may be None for
        an image-only model.
      temperature: divides the logits before the softmax of the reported probabilities
        (calibration); attributions are always of the raw logits.
      ig_steps: trapezoid intervals of integrated gradients.
    """

    def __init__(self, model, variables, tokenizer=None, temperature: float = 1.0,
                 ig_steps: int = IG_STEPS):
        self.model, self.tokenizer = model, tokenizer
        self.variables = jax.device_put(variables)  # once, not with every compiled call
        self.temperature = temperature
        self.masks = modality_masks(model.modalities)
        self._apply = jax.jit(lambda v, im, ids, am, keep: model.apply(
            v, im, ids, am, train=False, modality_mask=keep))
        self._grad_cam = jax.jit(functools.partial(grad_cam, model))
        self._ig = jax.jit(functools.partial(integrated_gradients, model, steps=ig_steps))

    def probabilities(self, image, input_ids, attention_mask) -> dict[str, np.ndarray]:
        """{tower combination: [B,K] probabilities} for ``modality_masks``."""
        out = {}
        for name, keep in self.masks.items():
            keep = np.broadcast_to(keep, (len(image), len(keep)))
            logits = self._apply(self.variables, image, input_ids, attention_mask, keep)
            out[name] = calibration.softmax(np.asarray(logits), self.temperature)
        return out

    def explain(self, image, input_ids, attention_mask, labels=None, texts=None,
                names=None) -> list[Explanation]:
        """Explains every example of a host batch.

        Args:
          image: uint8 [B,H,W,3]; input_ids, attention_mask: int [B,L].
          labels: optional [B] true classes; texts, names: optional [B] strings for titles.

        Returns:
          One ``Explanation`` per example, in order.
        """
        image, input_ids = np.asarray(image), np.asarray(input_ids)
        attention_mask = np.asarray(attention_mask)
        probs = self.probabilities(image, input_ids, attention_mask)
        both = next(iter(probs))
        predicted = probs[both].argmax(-1)
        cams = None
        if "image" in self.model.modalities:
            cams = np.asarray(self._grad_cam(self.variables, image, input_ids,
                                             attention_mask)[0])
        result = []
        for i in range(len(image)):
            attributions, gap, tokens = None, None, []
            if "text" in self.model.modalities:
                attributions, gap, tokens = self._attribute(
                    image[i:i + 1], input_ids[i:i + 1], attention_mask[i:i + 1],
                    int(predicted[i]))
            result.append(Explanation(
                image=image[i], text="" if texts is None else str(texts[i]), tokens=tokens,
                heatmap=None if cams is None else cams[i], attributions=attributions,
                ig_gap=gap, probs={k: v[i] for k, v in probs.items()},
                predicted=int(predicted[i]), label=None if labels is None else int(labels[i]),
                name="" if names is None else str(names[i])))
        return result

    def _attribute(self, image, input_ids, attention_mask, target):
        """(attributions of the real tokens, completeness gap, token strings) of one example."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("a model with a text tower needs its tokenizer to be explained")
        baseline = baseline_ids(input_ids, attention_mask, tok.pad_token_id,
                                (tok.cls_token_id, tok.sep_token_id))
        attr, at_input, at_baseline = jax.device_get(self._ig(
            self.variables, image, input_ids, attention_mask, baseline, target))
        real = attention_mask[0].astype(bool)
        difference = float(at_input - at_baseline)
        gap = abs(float(attr.sum()) - difference) / max(abs(difference), 1e-12)
        tokens = tok.convert_ids_to_tokens(input_ids[0][real].tolist())
        return np.asarray(attr)[real], gap, tokens


# ------------------------------------------------------------------------------------- figures

def _check_names(ex: Explanation, class_names) -> None:
    k = len(next(iter(ex.probs.values())))
    if len(class_names) != k:
        raise ValueError(f"got {len(class_names)} class names for a model of {k} classes")


def _title(ex: Explanation, class_names) -> str:
    p = next(iter(ex.probs.values()))[ex.predicted]  # the first entry uses every tower
    head = f"predicted {class_names[ex.predicted]} ({p:.2f})"
    if ex.label is not None:
        head += f"\ntrue {class_names[ex.label]}" + ("" if ex.label == ex.predicted else "  ✗")
    return head


def _overlay(ax, ex: Explanation, title: str) -> None:
    ax.imshow(ex.image)
    if ex.heatmap is not None:
        ax.imshow(heat_rgba(ex.heatmap, ex.image.shape[:2]))
    ax.set_title(title, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])


def _tokens(ax, fig, ex: Explanation) -> None:
    """Writes the tokens in reading order, each on a background shaded by its attribution."""
    ax.axis("off")
    if ex.attributions is None:
        ax.text(0, 0.9, ex.text or "(no text tower)", fontsize="small", va="top", wrap=True)
        return
    scale = max(float(np.abs(ex.attributions).max()), 1e-12)
    cmap = matplotlib.colormaps["RdBu_r"]
    # Monospace: a character is ~0.6 em wide, so the line layout needs no text measurement.
    char = 0.6 * 11 / (ax.get_position().width * fig.get_figwidth() * 72)
    x, y = 0.0, 0.95
    for token, a in zip(ex.tokens, ex.attributions, strict=True):
        width = (len(token) + 1) * char
        if x > 0 and x + width > 1.0:
            x, y = 0.0, y - 0.12
        ax.text(x, y, token, family="monospace", fontsize=11, va="top", transform=ax.transAxes,
                # At most 0.35 from the centre of the colour map: dark text stays readable.
                bbox={"facecolor": cmap(0.5 + 0.35 * a / scale), "edgecolor": "none",
                      "pad": 1.5})
        x += width
    ax.text(0.0, 0.02, f"integrated gradients (red: for, blue: against the prediction); "
            f"completeness gap {ex.ig_gap:.1%}", fontsize="x-small", transform=ax.transAxes)


def _bars(ax, ex: Explanation, class_names) -> None:
    """Grouped horizontal bars: one group per class, one bar per tower combination."""
    n, k = len(ex.probs), len(class_names)
    height = 0.8 / n
    for j, (name, p) in enumerate(ex.probs.items()):
        ax.barh(np.arange(k) + (j - (n - 1) / 2) * height, p, height, label=name)
    ax.set(yticks=range(k), xlim=(0, 1), xlabel="probability")
    ax.set_yticklabels(class_names)
    ax.invert_yaxis()
    ax.legend(fontsize="x-small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=n,
              frameon=False)


def render(ex: Explanation, class_names, path: str) -> str:
    """One example's figure: photo + Grad-CAM, shaded tokens, probabilities per tower set."""
    _check_names(ex, class_names)
    # Tall enough for the file name, two title lines and the square image: constrained layout
    # cannot shrink an equal-aspect image below its width, so a lower figure clips the title.
    fig = Figure(figsize=(10.5, 4.3), layout="constrained")
    left, middle, right = fig.subplots(1, 3, width_ratios=(1, 1.2, 1))
    name = os.path.basename(ex.name)
    if name:
        fig.suptitle(textwrap.shorten(name, 90, placeholder=" ..."), fontsize="medium")
    _overlay(left, ex, _title(ex, class_names))
    _tokens(middle, fig, ex)
    _bars(right, ex, class_names)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def render_gallery(explanations: list[Explanation], class_names, path: str,
                   columns: int = 4) -> str:
    """All explanations as a grid of heatmap overlays; «token» marks the top attribution."""
    for ex in explanations:
        _check_names(ex, class_names)
    rows = max(1, -(-len(explanations) // columns))
    # Each panel's words go in its title, above its own image: a caption below an image would
    # sit right above the next row's titles and read as theirs.
    fig = Figure(figsize=(3.2 * columns, 4.0 * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes[len(explanations):]:
        ax.axis("off")
    for ax, ex in zip(axes, explanations, strict=False):
        words = ex.text
        if ex.attributions is not None and len(ex.tokens):
            words = " ".join(f"«{t}»" if i == int(np.argmax(ex.attributions)) else t
                             for i, t in enumerate(ex.tokens))
        words = textwrap.shorten(words, 40, placeholder=" ...")
        _overlay(ax, ex, f"{words}\n{_title(ex, class_names)}")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=80)
    return path


# ------------------------------------------------------------------------------ writing a folder

def _slug(name: str) -> str:
    stem = os.path.splitext(os.path.basename(name))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_")[:60] or "example"


def write_explanations(trained, examples: list[dict], out_dir: str,
                       temperature: float = 1.0, batch_size: int = 16) -> list[str]:
    """Explains eval-view examples of a trained model: one PNG each plus ``paths.GALLERY_FILE``.

    Args:
      trained: a ``TrainedModel`` (model, variables, tokenizer, spec).
      examples: dicts with image (uint8 [H,W,3], the eval crop), text, and optionally label
        (int) and name (file name, used in titles and PNG names).
      out_dir: folder to write (created).
      temperature: calibration temperature of the reported probabilities.
      batch_size: examples per compiled call (the last batch is padded).

    Returns:
      The written PNG paths, the gallery last.
    """
    os.makedirs(out_dir, exist_ok=True)
    explainer = Explainer(trained.model, trained.variables, trained.tokenizer, temperature)
    tokenize = trained.tokenize_batch()
    found = []
    for chunk, padded in padded_batches(examples, batch_size):
        batch = tokenize({"image": np.stack([e["image"] for e in padded]),
                          "text": [e["text"] for e in padded]})
        found += explainer.explain(
            batch["image"], batch["input_ids"], batch["attention_mask"],
            labels=[e.get("label", -1) for e in padded], texts=[e["text"] for e in padded],
            names=[e.get("name", "") for e in padded])[:len(chunk)]
    for ex in found:
        ex.label = None if ex.label is None or ex.label < 0 else ex.label
    names = trained.class_names
    written = [render(ex, names, os.path.join(out_dir, f"{k:04d}_{_slug(ex.name)}.png"))
               for k, ex in enumerate(found)]
    if found:
        written.append(render_gallery(found, names, os.path.join(out_dir, paths.GALLERY_FILE)))
    return written
