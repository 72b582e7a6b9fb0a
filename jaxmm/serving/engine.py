"""The model behind the server: a bundle's ``Classifier`` and, when the bundle has them, its
explanation functions, run on a few fixed batch shapes that are all compiled before the server
says it is ready.

With the explanation functions (``export --explain``), one call of the bundle's ``towers``
function gives each example's probabilities with both towers, the image alone and the text
alone; without them the bundle's ``predict`` function gives the first only.
"""

import dataclasses

import numpy as np

from jaxmm.trained import bundle_explain
from jaxmm.trained.classifier import Classifier, padded_sizes, softmax

HOW_TO_EXPLAIN = ("this bundle was exported without explanation functions; export it again "
                  "with `python -m jaxmm.export --workdir RUN --out DIR --explain` and start "
                  "the server on that folder")


@dataclasses.dataclass
class Example:
    """One preprocessed request item: what the model sees and what the answer reports."""

    crop: np.ndarray  # uint8 [crop, crop, 3]
    input_ids: np.ndarray  # int32 [max_text_length]
    attention_mask: np.ndarray
    text: str  # the text given (or made from the file name)
    text_source: str  # "given", "file name" or "none"
    truncated: bool  # the text had more tokens than the model reads


class Engine:
    """A bundle ready to answer batches of ``Example`` on the default JAX device.

    Args:
      bundle_dir: the bundle folder.
      max_batch: the largest batch; smaller ones are padded to ``padded_sizes(max_batch)``.
      calibrated: divide the logits by the bundle's temperature, if it has one.
      cache_dir: JAX's persistent compilation cache (None: the per-user default; "": off).
    """

    def __init__(self, bundle_dir: str, max_batch: int, calibrated: bool = True,
                 cache_dir: str | None = None):
        self.classifier = Classifier.load(bundle_dir, batch_size=max_batch,
                                          calibrated=calibrated, cache_dir=cache_dir)
        self.record = self.classifier.record
        self.class_names = self.classifier.class_names
        self.model_id = self.classifier.model_id
        self.preprocessing = self.classifier.spec.preprocessing
        self.sizes = padded_sizes(max_batch)
        entry = bundle_explain.entry_of(self.record)
        self._functions = bundle_explain.load(bundle_dir, self.record) if entry else {}
        modalities = self.classifier.spec.modalities
        self.tower_sets = list(entry["tower_sets"]) if entry else ["+".join(modalities)]
        self.can_explain = bool(entry)

    def example(self, image, text: str | None, name: str | None) -> Example:
        """Preprocesses one image (a decoded PIL image) with its text (None: the file-name
        rule on ``name``, which is never opened; no name: the empty text).

        Raises:
          ValueError: one line, when the image cannot be converted.
        """
        if text is not None:
            source = "given"
        elif name:
            text, source = self.preprocessing.text_of(name), "file name"
        else:
            text, source = "", "none"
        ids, mask, cut = self.classifier.tokenize.encode(text)
        return Example(self.classifier.view(image), ids, mask, text, source, cut)

    def text_used(self, example: Example) -> str:
        """The words of the text that the model read (after truncation)."""
        return self.classifier.tokenize.decode(example.input_ids[example.attention_mask > 0])

    def _stack(self, examples: list[Example], size: int):
        padded = examples + [examples[0]] * (size - len(examples))
        return (np.stack([e.crop for e in padded]), np.stack([e.input_ids for e in padded]),
                np.stack([e.attention_mask for e in padded]))

    def probabilities(self, examples: list[Example]) -> np.ndarray:
        """Float32 [n, len(tower_sets), K] class probabilities of at most max_batch examples."""
        size = next(s for s in self.sizes if s >= len(examples))
        batch = self._stack(examples, size)
        if "towers" in self._functions:
            logits = np.asarray(self._functions["towers"](self.classifier.variables, *batch))
        else:
            logits = self.classifier.logits(*batch)[:, None]
        return softmax(logits[:len(examples)], self.classifier.temperature)

    def explain(self, example: Example) -> dict:
        """Grad-CAM map, token attributions and probabilities of one example.

        Raises:
          RuntimeError: the bundle has no explanation functions (``HOW_TO_EXPLAIN``).
        """
        if not self.can_explain:
            raise RuntimeError(HOW_TO_EXPLAIN)
        probs = self.probabilities([example])[0]
        predicted = int(probs[0].argmax())
        batch = self._stack([example], 1)
        out = {"probabilities": probs, "predicted": predicted, "heatmap": None, "tokens": None}
        variables = self.classifier.variables
        if "grad_cam" in self._functions:
            out["heatmap"] = np.asarray(self._functions["grad_cam"](variables, *batch)[0])[0]
        if "integrated_gradients" in self._functions:
            attr, at_input, at_baseline = (np.asarray(a) for a in self._functions[
                "integrated_gradients"](variables, *batch, np.int32(predicted)))
            real = example.attention_mask.astype(bool)
            difference = float(at_input - at_baseline)
            out["tokens"] = list(zip(self.classifier.tokenize.token_strings(
                example.input_ids[real]), attr[real].tolist(), strict=True))
            out["completeness_gap"] = (abs(float(attr[real].sum()) - difference)
                                       / max(abs(difference), 1e-12))
        return out

    def warm_up(self) -> None:
        """Compiles every batch shape (and the explanation functions) before serving."""
        side = self.preprocessing.crop_size
        dummy = self.example(np.zeros((side, side, 3), np.uint8), "warm up", None)
        for size in self.sizes:
            self.probabilities([dummy] * size)
        if self.can_explain:
            self.explain(dummy)
