"""Input-pipeline throughput: the original per-sample loader vs the prepared grain pipeline.

    python benchmarks/input_pipeline.py [--data_dir RAW] [--per_class 75] [--epochs 3]
        [--grain_workers 0,1,2[,auto]] [--repeats 3] [--steady_batches 40] [--skip_original]

On the same raw Train images and machine, in one run, measures
  (a) the original loader: per sample PIL open + convert + resize to 224 + normalise + tokenise,
      in a 2-worker torch DataLoader (a 2-process pool without torch), every epoch;
  (b) the prepared grain train pipeline alone (``make_train_iter``: random-resized crop + flip,
      batched tokenisation, uint8 batches) for each grain worker count in --grain_workers
      (``auto`` = nproc - 2): start-up (iterator creation to first batch) and steady state
      (samples/s over --steady_batches batches after the first 2 x workers + 2), each the median
      of --repeats runs, runs of different worker counts interleaved; with psutil installed also
      the CPU time per sample of the main process and of the workers, which load from other jobs
      does not change;
  (c) the one-off prepare time.
Without --data_dir it first writes synthetic 1024-px PNGs. The last line is ``speedup: X.X``
(in-process steady state over (a)).

Heavy modules (transformers, prepare, torch) are imported inside functions: grain's workers are
spawned processes that import this module again, and their start-up should be what a training
run (whose entry point imports little) sees.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxmm.data import captions  # noqa: E402

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
    import multiprocessing as mp

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


def _cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds (user + system) of this process and of its live children; None w/o psutil."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    times = me.cpu_times()
    children = 0.0
    for child in me.children(recursive=True):
        try:
            ct = child.cpu_times()
        except psutil.Error:
            continue
        children += ct.user + ct.system
    return times.user + times.system, children


def measure_pipeline(config, source, tokenizer, batch_size: int, steady_batches: int) -> dict:
    """One run of the train pipeline alone: start-up, then steady-state samples/s.

    Start-up is iterator creation to the first batch (worker processes spawn and import then).
    The steady window starts after 2 x workers + 2 batches, once every worker has delivered.
    """
    from jaxmm.data import pipeline

    warm = 2 * config.num_workers + 2
    per_epoch = len(source) // batch_size
    epochs = (warm + steady_batches) // max(per_epoch, 1) + 2
    start = time.perf_counter()
    it = pipeline.make_train_iter(config, source, tokenizer, local_batch_size=batch_size,
                                  process_index=0, process_count=1, num_epochs=epochs)
    try:
        next(it)
        first = time.perf_counter() - start
        for _ in range(warm - 1):
            next(it)
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(steady_batches):
            next(it)
        seconds, cpu1 = time.perf_counter() - t0, _cpu_seconds()
    finally:
        it.close()
    n = steady_batches * batch_size
    res = {"startup_s": first, "samples_per_s": n / seconds}
    if cpu0 and cpu1:
        res["cpu_ms_per_sample_main"] = 1000 * (cpu1[0] - cpu0[0]) / n
        res["cpu_ms_per_sample_workers"] = 1000 * (cpu1[1] - cpu0[1]) / n
    return res


def worker_counts(spec: str) -> list[int]:
    """'0,1,2,auto' -> [0, 1, 2, nproc - 2] (duplicates dropped, order kept)."""
    out = []
    for item in spec.split(","):
        n = max(1, (os.cpu_count() or 1) - 2) if item.strip() == "auto" else int(item)
        if n < 0:
            raise ValueError(f"--grain_workers: negative worker count {n}")
        if n not in out:
            out.append(n)
    return out


def compare_workers(config, source, tokenizer, args) -> dict:
    """Medians over --repeats interleaved runs per worker count; ratios to in-process."""
    counts = worker_counts(args.grain_workers)
    runs = {w: [] for w in counts}
    for _ in range(args.repeats):
        for w in counts:  # interleaved, so slow drifts of the machine's load hit every count
            config.num_workers = w
            runs[w].append(measure_pipeline(config, source, tokenizer, args.batch_size,
                                            args.steady_batches))
    table = {}
    for w, rs in runs.items():
        row = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        row["samples_per_s_runs"] = [round(r["samples_per_s"], 1) for r in rs]
        table[w] = row
    if 0 in table:
        for row in table.values():
            row["vs_in_process"] = round(row["samples_per_s"] / table[0]["samples_per_s"], 2)
    return table


def _prepare(args, work: str):
    from jaxmm.data import builder, prepared, synthetic

    data_dir = args.data_dir or os.path.join(work, "raw")
    if not args.data_dir and not builder.has_dataset(data_dir):  # a kept --work_dir is reused
        synthetic.generate(data_dir, args.per_class, seed=0, max_side=1024)
    start = time.perf_counter()
    ds_dir, _ = prepared.prepare(data_dir, os.path.join(work, "prepared"), workers=args.workers,
                                 log=lambda s: None)
    return data_dir, ds_dir, time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="", help="raw root (default: synthetic 1024-px PNGs)")
    p.add_argument("--work_dir", default="", help="where synthetic data and prepare output go")
    p.add_argument("--per_class", type=int, default=75, help="synthetic Train images per class")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the original loader (a)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="prepare processes")
    p.add_argument("--grain_workers", default="0,1,2", help="worker counts of (b); auto=nproc-2")
    p.add_argument("--repeats", type=int, default=3, help="runs per worker count (medians)")
    p.add_argument("--steady_batches", type=int, default=40, help="timed batches per run")
    p.add_argument("--skip_original", action="store_true", help="do not measure (a)")
    p.add_argument("--out", default="", help="also write the JSON result here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Runs (c), (a) and (b); prints a report and one JSON line; returns the result."""
    from absl import flags
    from ml_collections import ConfigDict

    from jaxmm.data import builder, pipeline, prepared

    flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads absl flags
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="jaxmm_bench_")
    data_dir, ds_dir, prep_s = _prepare(args, work)
    config = ConfigDict(dict(tokenizer="", tokenizer_vocab_size=1000, seed=0, image_size=224,
                             max_text_length=32, color_jitter=0.0, num_workers=0))
    tokenizer = prepared.get_tokenizer(config, ds_dir)
    scan = builder.scan(data_dir, [], "filename")
    files = [(os.path.join(data_dir, s.rel_path), s.label) for s in scan.plan["train"]]
    original = None
    if not args.skip_original:
        original = run_original(OriginalDataset(files, tokenizer, 32), args.batch_size,
                                args.epochs)
    table = compare_workers(config, pipeline.load_splits(ds_dir)["train"], tokenizer, args)
    res = {"train_files": len(files), "cores": os.cpu_count(), "batch_size": args.batch_size,
           "load_average_end": round(os.getloadavg()[0], 1), "prepare_s": round(prep_s, 1),
           "original_samples_per_s": original and round(original, 1),
           "grain": {str(w): row for w, row in table.items()}}
    print_report(res)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return res


def print_report(res: dict) -> None:
    """Human-readable lines, the JSON line, and ``speedup: X.X`` last."""
    print(f"images: {res['train_files']} train files, {res['cores']} cores, load average "
          f"{res['load_average_end']} at the end, batch {res['batch_size']}")
    if res["original_samples_per_s"]:
        print(f"(a) original per-sample loader, 2 workers: {res['original_samples_per_s']} "
              "samples/s")
    for w, row in res["grain"].items():
        cpu = ""
        if "cpu_ms_per_sample_main" in row:
            cpu = (f", CPU {row['cpu_ms_per_sample_main']:.2f} + "
                   f"{row['cpu_ms_per_sample_workers']:.2f} ms/sample (main + workers)")
        print(f"(b) grain, {w} workers: steady {row['samples_per_s']:.1f} samples/s "
              f"({row.get('vs_in_process', '-')}x in-process; runs {row['samples_per_s_runs']}), "
              f"start-up {row['startup_s']:.2f} s{cpu}")
    print(f"(c) prepare (one-off): {res['prepare_s']} s")
    print(json.dumps(res))
    base = res["grain"].get("0")
    if res["original_samples_per_s"] and base:
        print(f"speedup: {base['samples_per_s'] / res['original_samples_per_s']:.1f}")


if __name__ == "__main__":
    main()
