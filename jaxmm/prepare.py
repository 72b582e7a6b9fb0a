"""Prepare once: raw class folders -> a TFDS ArrayRecord dataset for fast training.

    python -m jaxmm.prepare --data_dir RAW --out_dir OUT [--image_size 256] [--workers K]
        [--text_source filename|caption|both] [--class_names A,B,...]

Scans ``RAW/CVPR_2024_dataset_{Train,Val,Test}/<Class>/``, decodes and resizes every image once
(all cores), and writes ``OUT/jaxmm_garbage/1.0.0`` plus ``OUT/prepare_report.json``. A second run
on unchanged input and options does nothing (a fingerprint of file names, sizes, mtimes and
options is kept in OUT). Bad files are skipped and listed in the report, never dropped silently.
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

from jaxmm.data import builder as builder_lib
from jaxmm.data import captions as captions_lib
from jaxmm.data.builder import PrepareError

FORMAT_VERSION = 1  # bump when the record layout or image processing changes
REPORT_FILE = "prepare_report.json"
FINGERPRINT_FILE = "prepare_fingerprint.json"
DONE_MARKER = "prepare_done.json"
META_FILE = "jaxmm_meta.json"


def dataset_path(out_dir: str) -> str:
    """Directory `tfds.builder_from_directory` opens inside an output root."""
    return os.path.join(out_dir, builder_lib.DATASET_NAME,
                        str(builder_lib.GarbageDataset.VERSION))


def _fingerprint(scan: builder_lib.Scan, options: dict) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, options], sort_keys=True).encode())
    for entry in scan.stats:
        h.update(repr(entry).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _options(scan: builder_lib.Scan, image_size: int, text_source: str,
             image_format: str) -> dict:
    return {"image_size": image_size, "text_source": text_source,
            "class_names": scan.class_names, "image_format": image_format}


def _config_fingerprint(config) -> str | None:
    """Fingerprint prepare would store for a config, or None while the raw data is incomplete."""
    try:
        scan = builder_lib.scan(config.data_dir, list(config.class_names), config.text_source)
    except PrepareError:
        return None
    return _fingerprint(scan, _options(scan, config.stored_image_size, config.text_source,
                                       "jpeg"))


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to a temporary file and renames it, so readers never see a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _build(scan: builder_lib.Scan, out_dir: str, enc: builder_lib.EncodeOptions,
           workers: int) -> list[dict]:
    """Writes the TFDS dataset; returns the files skipped while decoding."""
    shutil.rmtree(os.path.join(out_dir, builder_lib.DATASET_NAME), ignore_errors=True)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own tqdm bar counts images per split
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        b = builder_lib.GarbageDataset(plan=scan.plan, class_names=scan.class_names,
                                       raw_dir=scan.data_dir, options=enc, pool=pool,
                                       data_dir=out_dir, file_format="array_record")
        b.download_and_prepare(download_dir=os.path.join(out_dir, ".downloads"))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    shutil.rmtree(os.path.join(out_dir, ".downloads"), ignore_errors=True)
    return b.skipped


def _report(scan: builder_lib.Scan, decode_skipped: list[dict], options: dict,
            seconds: float) -> dict:
    bad = {(s["split"], s["file"]) for s in decode_skipped}
    counts = {}
    for split, samples in scan.plan.items():
        counts[split] = {c: 0 for c in scan.class_names}
        for s in samples:
            if (split, s.rel_path) not in bad:
                counts[split][scan.class_names[s.label]] += 1
    return {
        "options": options, "class_names": scan.class_names, "counts": counts,
        "num_examples": {k: sum(v.values()) for k, v in counts.items()},
        "skipped": scan.skipped + decode_skipped,
        "text_sources": scan.text_counts, "warnings": scan.warnings,
        "seconds": round(seconds, 1),
    }


def prepare(data_dir: str, out_dir: str, *, image_size: int = 256, workers: int = 0,
            text_source: str = "filename", class_names=(), image_format: str = "jpeg",
            log=print) -> tuple[str, bool]:
    """Builds the prepared dataset unless it is up to date.

    Args:
      data_dir: raw root with CVPR_2024_dataset_{Train,Val,Test}/<Class>/ folders.
      out_dir: output root (created).
      image_size: stored shorter side in pixels (aspect kept).
      workers: decode processes (0 = all cores, or fewer for small datasets).
      text_source: 'filename', 'caption' or 'both'.
      class_names: label order; empty = sorted Train class folders.
      image_format: 'jpeg' (q95) or 'png'.
      log: where warnings and the summary go.

    Returns:
      (dataset directory, built): built is False when nothing had to be done.

    Raises:
      PrepareError: a user error (missing split, unknown class folder, empty split, ...).
    """
    scan = builder_lib.scan(data_dir, list(class_names), text_source)
    options = _options(scan, image_size, text_source, image_format)
    fingerprint = _fingerprint(scan, options)
    ds_dir = dataset_path(out_dir)
    stored = _read_json(os.path.join(out_dir, FINGERPRINT_FILE)) or {}
    if stored.get("fingerprint") == fingerprint and os.path.isfile(
            os.path.join(ds_dir, "dataset_info.json")):
        log(f"prepare: {ds_dir} is up to date; nothing to do")
        return ds_dir, False
    for w in scan.warnings:
        log(f"WARNING: {w}")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, FINGERPRINT_FILE)):
        os.remove(os.path.join(out_dir, FINGERPRINT_FILE))  # a crash below must not look done
    start = time.perf_counter()
    enc = builder_lib.EncodeOptions(size=image_size, fmt=image_format)
    if not workers:
        # Starting a spawn pool costs seconds; tiny (demo, test) datasets decode faster alone.
        n_files = sum(len(v) for v in scan.plan.values())
        workers = min(os.cpu_count() or 1, max(1, n_files // 64))
    skipped = _build(scan, out_dir, enc, workers)
    report = _report(scan, skipped, options, time.perf_counter() - start)
    write_json_atomic(os.path.join(out_dir, REPORT_FILE), report)
    write_json_atomic(os.path.join(ds_dir, META_FILE), {
        k: report[k] for k in ("class_names", "counts", "num_examples", "options")})
    write_json_atomic(os.path.join(out_dir, FINGERPRINT_FILE), {"fingerprint": fingerprint})
    log(summary(report, ds_dir))
    return ds_dir, True


def summary(report: dict, ds_dir: str) -> str:
    """A few human-readable lines about a prepare report."""
    lines = [f"prepared {ds_dir} in {report['seconds']} s"]
    for split, counts in report["counts"].items():
        per = ", ".join(f"{c} {n}" for c, n in counts.items())
        lines.append(f"  {split}: {report['num_examples'][split]} ({per})")
    for split, t in report["text_sources"].items():
        lines.append(f"  {split} texts: {t['csv']} from captions, {t['filename']} from file names"
                     f" ({t['fallback']} caption fallbacks)")
    lines.append(f"  skipped {len(report['skipped'])} files (reasons in {REPORT_FILE})")
    return "\n".join(lines)


def prepared_dir(config) -> str:
    """Where prepare writes for a config: ``prepared_dir``, else <data_dir>/jaxmm_prepared."""
    return config.prepared_dir or os.path.join(config.data_dir, "jaxmm_prepared")


def _prepare_from_config(config, log=print) -> str:
    """Process-0 work of ensure_prepared: demo data, dataset, tokenizer, done marker."""
    demo = config.get("demo", None)
    if demo is not None and demo.enabled and not builder_lib.has_dataset(config.data_dir):
        from jaxmm.data import synthetic

        log(f"demo: generating synthetic data in {config.data_dir}")
        synthetic.generate(config.data_dir, demo.per_class, demo.seed, demo.max_side)
    out_dir = prepared_dir(config)
    ds_dir, _ = prepare(config.data_dir, out_dir, image_size=config.stored_image_size,
                        text_source=config.text_source, class_names=tuple(config.class_names),
                        log=log)
    if not config.tokenizer:
        from jaxmm.data import tokenizer as tokenizer_lib

        tokenizer_lib.get_tokenizer(config, ds_dir)  # trains once, before others may read it
    stored = _read_json(os.path.join(out_dir, FINGERPRINT_FILE)) or {}
    write_json_atomic(os.path.join(out_dir, DONE_MARKER),
                      {"dataset_dir": ds_dir, "fingerprint": stored.get("fingerprint")})
    return ds_dir


def ensure_prepared(config, *, timeout_s: float = 7200.0, poll_s: float = 2.0) -> str:
    """Prepares the dataset described by a config if needed; safe on every JAX process.

    Process 0 generates demo data (config.demo.enabled and no data yet), runs `prepare`, trains
    the demo tokenizer when config.tokenizer is empty and finally writes OUT/prepare_done.json
    atomically. Other processes wait until that marker holds the fingerprint of the current raw
    data and options, so callers need no extra barrier (a stale marker never matches).

    Args:
      config: ConfigDict with data_dir, prepared_dir, class_names, text_source,
        stored_image_size, tokenizer and demo fields.
      timeout_s: how long non-zero processes wait before raising.
      poll_s: polling interval of waiting processes.

    Returns:
      The TFDS dataset directory.

    Raises:
      PrepareError: bad input, or process 0 did not finish within timeout_s.
    """
    import jax

    if jax.process_index() == 0:
        return _prepare_from_config(config)
    marker = os.path.join(prepared_dir(config), DONE_MARKER)
    start = time.time()
    while time.time() - start < timeout_s:
        done = _read_json(marker)
        if done and done.get("fingerprint") == _config_fingerprint(config):
            return done["dataset_dir"]
        time.sleep(poll_s)
    raise PrepareError(f"process {jax.process_index()}: no completion marker {marker} after "
                       f"{timeout_s:.0f} s; did process 0 fail to prepare the dataset?")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; user errors print one line and exit 2."""
    p = argparse.ArgumentParser(description="Prepare the raw dataset once for training.")
    p.add_argument("--data_dir", required=True, help="raw root with CVPR_2024_dataset_* folders")
    p.add_argument("--out_dir", required=True, help="output root")
    p.add_argument("--image_size", type=int, default=256, help="stored shorter side (px)")
    p.add_argument("--workers", type=int, default=0, help="decode processes (0 = all cores)")
    p.add_argument("--text_source", default="filename", choices=captions_lib.TEXT_SOURCES)
    p.add_argument("--class_names", default="", help="comma-separated label order")
    p.add_argument("--image_format", default="jpeg", choices=("jpeg", "png"))
    args = p.parse_args(argv)
    names = tuple(n for n in args.class_names.split(",") if n)
    try:
        prepare(args.data_dir, args.out_dir, image_size=args.image_size, workers=args.workers,
                text_source=args.text_source, class_names=names, image_format=args.image_format)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
