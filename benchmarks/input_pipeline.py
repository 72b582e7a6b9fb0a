"""Input-pipeline throughput: per-sample PIL loading (the original way) vs prepared + grain.

    python benchmarks/input_pipeline.py [--data_dir RAW] [--per_class 75] [--epochs 3]

On the same raw Train images and machine, in one run, measures
  (a) the original loader: per sample PIL open + convert + resize to 224 + normalise + tokenise,
      in a 2-worker torch DataLoader (a 2-process pool without torch), every epoch;
  (b) the prepared grain train pipeline (random-resized crop + flip + batched tokenisation),
      in-process (--grain_workers 0, the faster setting on 2 cores) and with 2 grain workers;
  (c) the one-off prepare time.
Without --data_dir it first writes synthetic 1024-px PNGs. The last line is ``speedup: X.X``.
"""

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxmm.data import builder, captions, pipeline, prepared, synthetic  # noqa: E402
from jaxmm.data import tokenizer as tokenizer_lib  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class OriginalDataset:
    """The reference per-sample loader: decode the full PNG every time it is read."""

    def __init__(self, files, tokenizer, max_length):
        self.files, self.tokenizer, self.max_length = files, tokenizer, max_length

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        img = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
        x = ((np.asarray(img, np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
        enc = self.tokenizer(captions.text_from_filename(path), padding="max_length",
                             truncation=True, max_length=self.max_length)
        return x, np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"]), label


def run_original(dataset, batch_size: int, epochs: int) -> float:
    """Samples/s of the original loader over `epochs` epochs (workers restart each epoch)."""
    n, start = 0, time.perf_counter()
    try:
        import torch.utils.data as tud
    except ImportError:
        tud = None
    for _ in range(epochs):
        if tud is not None:
            loader = tud.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2)
            for batch in loader:
                n += len(batch[3])
        else:
            with mp.get_context("spawn").Pool(2) as pool:
                for item in pool.imap(dataset.__getitem__, range(len(dataset)), chunksize=4):
                    n += 1 + 0 * len(item)
    return n / (time.perf_counter() - start)


def run_grain(config, source, tokenizer, batch_size: int, epochs: int) -> float:
    """Samples/s of the prepared train pipeline (the first batch, i.e. start-up, included)."""
    it = pipeline.make_train_iter(config, source, tokenizer, local_batch_size=batch_size,
                                  process_index=0, process_count=1, num_epochs=epochs)
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch["label"])
    rate = n / (time.perf_counter() - start)
    if hasattr(it, "close"):
        it.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="", help="raw root (default: synthetic 1024-px PNGs)")
    p.add_argument("--per_class", type=int, default=75, help="synthetic Train images per class")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="prepare processes")
    p.add_argument("--grain_workers", type=int, default=0, help="grain workers of (b)")
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads absl flags
    work = tempfile.mkdtemp(prefix="jaxmm_bench_")
    data_dir = args.data_dir or synthetic.generate(os.path.join(work, "raw"), args.per_class,
                                                   seed=0, max_side=1024)
    start = time.perf_counter()
    ds_dir, _ = prepared.prepare(data_dir, os.path.join(work, "prepared"), workers=args.workers,
                                 log=lambda s: None)
    prep_s = time.perf_counter() - start
    from ml_collections import ConfigDict

    config = ConfigDict(dict(tokenizer="", tokenizer_vocab_size=1000, seed=0, image_size=224,
                             max_text_length=32, color_jitter=0.0,
                             num_workers=args.grain_workers))
    tokenizer = tokenizer_lib.get_tokenizer(config, ds_dir)
    scan = builder.scan(data_dir, [], "filename")
    files = [(os.path.join(data_dir, s.rel_path), s.label) for s in scan.plan["train"]]
    a = run_original(OriginalDataset(files, tokenizer, 32), args.batch_size, args.epochs)
    source = pipeline.load_splits(ds_dir)["train"]
    b = run_grain(config, source, tokenizer, args.batch_size, args.epochs * 4)
    config.num_workers = 2
    b2 = run_grain(config, source, tokenizer, args.batch_size, args.epochs * 4)
    print(f"images: {len(files)} train files, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, batch {args.batch_size}")
    print(f"(a) original per-sample loader, 2 workers: {a:.1f} samples/s")
    print(f"(b) prepared grain pipeline, {args.grain_workers} grain workers: {b:.1f} samples/s "
          f"(2 grain workers: {b2:.1f} samples/s, start-up included)")
    print(f"(c) prepare (one-off, {len(files)} train + val + test files): {prep_s:.1f} s")
    print(f"speedup: {b / a:.1f}")


if __name__ == "__main__":
    main()
