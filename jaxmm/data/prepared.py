"""The prepared dataset: raw class folders -> a TFDS ArrayRecord dataset, built once.

``prepare`` scans ``RAW/CVPR_2024_dataset_{Train,Val,Test}/<Class>/``, decodes and resizes every
image once (all cores), hashes it for the cross-split copy check, and writes
``OUT/jaxmm_garbage/1.0.0`` plus ``OUT/prepare_report.json``. A second run on unchanged input and
options does nothing (a fingerprint of file names, sizes, mtimes and options is kept in OUT). The
new dataset is built in a temporary folder inside OUT and swapped in only when it is complete, so
a failed or interrupted run leaves the previous dataset as it was. ``ensure_prepared`` does the
same from a config on every JAX process. ``python -m jaxmm.prepare`` is the command line.
"""

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import time

from jaxmm import files, paths
from jaxmm.data import builder as builder_lib
from jaxmm.data import dedup
from jaxmm.data import tokenizer as tokenizer_lib
from jaxmm.errors import PrepareError

FORMAT_VERSION = 2  # bump when the record layout or image processing changes
IMAGE_FORMATS = ("jpeg", "png")
TMP_PREFIX = ".prepare-tmp-"  # OUT/.prepare-tmp-<pid>: the dataset being built


def _options(scan: builder_lib.Scan, stored_image_size: int, text_source: str,
             image_format: str, exif_transpose: bool) -> dict:
    out = {"stored_image_size": stored_image_size, "text_source": text_source,
           "class_names": scan.class_names, "image_format": image_format}
    if exif_transpose:
        # Recorded only when on, so that datasets prepared before the option existed (never
        # turned) keep their fingerprint when prepared again with --no-exif_transpose.
        out["exif_transpose"] = True
    return out


def _fingerprint(scan: builder_lib.Scan, options: dict) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, options], sort_keys=True).encode())
    for entry in scan.stats:
        h.update(repr(entry).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def config_fingerprint(config) -> str | None:
    """Fingerprint prepare would store for a config, or None while the raw data is incomplete."""
    try:
        scan = builder_lib.scan(config.data_dir, list(config.class_names), config.text_source)
    except PrepareError:
        return None
    return _fingerprint(scan, _options(scan, config.stored_image_size, config.text_source,
                                       "jpeg", config.get("exif_transpose", True)))


def check_options(stored_image_size, workers, image_format) -> None:
    """Raises PrepareError naming the first bad prepare option."""
    if isinstance(stored_image_size, bool) or not isinstance(stored_image_size, int) or \
            stored_image_size < 1:
        raise PrepareError(f"stored_image_size must be a positive number of pixels, got "
                           f"{stored_image_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise PrepareError(f"workers must be 0 (all cores) or a positive count, got {workers!r}")
    if image_format not in IMAGE_FORMATS:
        raise PrepareError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def _make_out_dir(out_dir: str) -> None:
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"out_dir {out_dir} exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create out_dir {out_dir}: {e.strerror or e}") from None


def _build(scan: builder_lib.Scan, tmp_root: str, enc: builder_lib.EncodeOptions,
           workers: int) -> builder_lib.GarbageDataset:
    """Writes the TFDS dataset below tmp_root; returns the builder (skipped files, hashes)."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own tqdm bar counts images per split
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    b = builder_lib.GarbageDataset(plan=scan.plan, class_names=scan.class_names,
                                   raw_dir=scan.data_dir, options=enc, pool=pool,
                                   data_dir=tmp_root, file_format="array_record")
    try:
        # tfds prints where it wrote (the temporary folder); the summary names the real one.
        with contextlib.redirect_stdout(io.StringIO()):
            b.download_and_prepare(download_dir=os.path.join(tmp_root, ".downloads"))
    except AssertionError:  # tfds: "No examples were yielded" for a split
        _check_written(scan, b)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return b


def _check_written(scan: builder_lib.Scan, b: builder_lib.GarbageDataset) -> None:
    """A split of which no file decoded is an error (nothing to train or evaluate on)."""
    for split, folder in builder_lib.SPLIT_FOLDERS.items():
        if split in b.hashes and not b.hashes[split]:
            first = next(s for s in b.skipped if s["split"] == split)
            split_dir = os.path.join(scan.data_dir, builder_lib.FOLDER_PATTERN.format(folder))
            raise PrepareError(
                f"no image of split folder {split_dir} could be decoded "
                f"({len(scan.plan[split])} tried; e.g. {first['file']}: {first['reason']})")


def _report(scan: builder_lib.Scan, b: builder_lib.GarbageDataset, options: dict,
            seconds: float) -> dict:
    bad = {(s["split"], s["file"]) for s in b.skipped}
    counts = {}
    for split, samples in scan.plan.items():
        counts[split] = {c: 0 for c in scan.class_names}
        for s in samples:
            if (split, s.rel_path) not in bad:
                counts[split][scan.class_names[s.label]] += 1
    return {
        "options": options, "class_names": scan.class_names, "counts": counts,
        "num_examples": {k: sum(v.values()) for k, v in counts.items()},
        "skipped": scan.skipped + b.skipped,
        "text_sources": scan.text_counts, "warnings": scan.warnings,
        "duplicates": {**dedup.find_duplicates(b.hashes), "within": dedup.find_within(b.hashes)},
        "seconds": round(seconds, 1),
    }


def _swap_in(tmp_root: str, out_dir: str) -> None:
    """Replaces OUT/<dataset> by the one built in tmp_root (two renames on one file system)."""
    for name in (paths.FINGERPRINT_FILE, paths.DONE_MARKER):  # the old ones describe old data
        if os.path.lexists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    final = os.path.join(out_dir, paths.DATASET_NAME)
    if os.path.lexists(final):
        os.rename(final, os.path.join(tmp_root, "previous"))  # deleted with tmp_root
    os.rename(os.path.join(tmp_root, paths.DATASET_NAME), final)


def _default_workers(scan: builder_lib.Scan) -> int:
    # Starting a spawn pool costs seconds; tiny (demo, test) datasets decode faster alone.
    n_files = sum(len(v) for v in scan.plan.values())
    return min(os.cpu_count() or 1, max(1, n_files // 64))


def prepare(data_dir: str, out_dir: str, *, stored_image_size: int = 256, workers: int = 0,
            text_source: str = "filename", class_names=(), image_format: str = "jpeg",
            exif_transpose: bool = True, log=print) -> tuple[str, bool]:
    """Builds the prepared dataset unless it is up to date.

    Args:
      data_dir: raw root with CVPR_2024_dataset_{Train,Val,Test}/<Class>/ folders.
      out_dir: output root (created).
      stored_image_size: stored shorter side in pixels (aspect kept).
      workers: decode processes (0 = all cores, or fewer for small datasets).
      text_source: 'filename', 'caption' or 'both'.
      class_names: label order; empty = sorted Train class folders.
      image_format: 'jpeg' (q95) or 'png'.
      exif_transpose: turn images upright by their EXIF orientation tag (phone photos) before
        storing them; recorded in the dataset's options, and so in every model trained on it.
      log: where warnings and the summary go.

    Returns:
      (dataset directory, built): built is False when nothing had to be done.

    Raises:
      PrepareError: a user error (missing split, unknown class folder, empty split, a split
        where nothing decodes, bad option, out_dir not a folder, ...). The previous dataset in
        out_dir is then left as it was.
    """
    check_options(stored_image_size, workers, image_format)
    scan = builder_lib.scan(data_dir, list(class_names), text_source)
    options = _options(scan, stored_image_size, text_source, image_format, exif_transpose)
    fingerprint = _fingerprint(scan, options)
    ds_dir = paths.dataset_path(out_dir)
    stored = files.read_json(os.path.join(out_dir, paths.FINGERPRINT_FILE)) or {}
    if stored.get("fingerprint") == fingerprint and os.path.isfile(
            os.path.join(ds_dir, "dataset_info.json")):
        log(f"prepare: {ds_dir} is up to date; nothing to do")
        return ds_dir, False
    for w in scan.warnings:
        log(f"WARNING: {w}")
    _make_out_dir(out_dir)
    start = time.perf_counter()
    tmp_root = os.path.join(out_dir, f"{TMP_PREFIX}{os.getpid()}")
    shutil.rmtree(tmp_root, ignore_errors=True)
    try:
        enc = builder_lib.EncodeOptions(size=stored_image_size, fmt=image_format,
                                        exif_transpose=exif_transpose)
        b = _build(scan, tmp_root, enc, workers or _default_workers(scan))
        report = _report(scan, b, options, time.perf_counter() - start)
        files.write_json(os.path.join(paths.dataset_path(tmp_root), paths.META_FILE), {
            k: report[k] for k in ("class_names", "counts", "num_examples", "options",
                                   "duplicates")})
        _swap_in(tmp_root, out_dir)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    files.write_json(os.path.join(out_dir, paths.REPORT_FILE), report)
    files.write_json(os.path.join(out_dir, paths.FINGERPRINT_FILE), {"fingerprint": fingerprint})
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
    lines.append(f"  skipped {len(report['skipped'])} files (reasons in {paths.REPORT_FILE})")
    if "duplicates" in report:
        lines.append(dedup.summary_line(report["duplicates"]))
        if "within" in report["duplicates"]:
            lines.append(dedup.within_line(report["duplicates"]["within"]))
    return "\n".join(lines)


def prepared_dir(config) -> str:
    """Where prepare writes for a config: ``prepared_dir``, else <data_dir>/jaxmm_prepared."""
    return config.prepared_dir or os.path.join(config.data_dir, paths.DEFAULT_PREPARED_SUBDIR)


def existing_dataset(config) -> str:
    """The prepared dataset of a run's config, where prepare wrote it; never prepared here.

    Raises:
      WorkdirError: no prepared dataset there; the message names the path and the command.
    """
    from jaxmm.errors import WorkdirError

    out_dir = prepared_dir(config)
    recorded = paths.dataset_path(out_dir)
    if os.path.isfile(os.path.join(recorded, paths.META_FILE)):
        return recorded
    command = (f"python -m jaxmm.prepare --data_dir {config.data_dir} --out_dir {out_dir} "
               f"--stored_image_size {config.stored_image_size} --text_source "
               f"{config.text_source}")
    if config.class_names:
        command += f" --class_names {','.join(config.class_names)}"
    raise WorkdirError(f"no prepared dataset at {recorded} (where the run's config.json points);"
                       f" evaluation never prepares data: run `{command}` first")


def dataset_meta(dataset_dir: str) -> dict:
    """Class names and counts of a prepared dataset (no record is read).

    Returns:
      dict(class_names=list[str], counts={split: {class: n}}, num_examples={split: n},
           options={...} (how prepare stored the records: stored_image_size, image_format, ...)).
    """
    with open(os.path.join(dataset_dir, paths.META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    out = {k: meta[k] for k in ("class_names", "counts", "num_examples")}
    out["options"] = meta.get("options", {})
    return out




def data_record(dataset_dir: str, meta: dict) -> dict:
    """What identifies a prepared dataset (fingerprint, class names, sizes, counts, options) and
    what prepare reported about it (skipped files, copies across splits, text sources)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(dataset_dir)))
    stored = files.read_json(os.path.join(root, paths.FINGERPRINT_FILE)) or {}
    report = files.read_json(os.path.join(root, paths.REPORT_FILE)) or {}
    duplicates = report.get("duplicates") or {}
    return {"fingerprint": stored.get("fingerprint"), "class_names": list(meta["class_names"]),
            "num_examples": dict(meta["num_examples"]), "counts": meta.get("counts", {}),
            "options": meta.get("options", {}),
            # What prepare reported, kept with the run so its model card needs no dataset.
            "report": {"skipped": len(report.get("skipped") or []),
                       "duplicates": {k: duplicates.get(k) for k in ("exact", "near", "counts")},
                       "text_sources": report.get("text_sources")}}


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
        return tokenizer_lib.load_tokenizer(config.tokenizer)
    out_dir = os.path.join(dataset_dir, tokenizer_lib.TOKENIZER_SUBDIR)
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return tokenizer_lib.load_tokenizer(out_dir)
    # Write to a private folder and rename, so a concurrent reader never sees half a tokenizer.
    tmp = f"{out_dir}.tmp{os.getpid()}"
    tokenizer_lib.train_wordpiece(_train_texts(dataset_dir),
                                  config.get("tokenizer_vocab_size", 1000), tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race; its tokenizer is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer_lib.load_tokenizer(out_dir)


def _generate_demo(config, log) -> None:
    """Writes synthetic data into config.data_dir when the demo asks for it and it is new."""
    demo = config.get("demo", None)
    if demo is None or not demo.enabled or builder_lib.has_dataset(config.data_dir):
        return
    from jaxmm.data import synthetic

    synthetic.check_target(config.data_dir)
    log(f"demo: {config.data_dir} holds no dataset and is new or empty; generating synthetic "
        "data there")
    synthetic.generate(config.data_dir, demo.per_class, demo.seed, demo.max_side)


def _prepare_from_config(config, log=print) -> str:
    """Process-0 work of ensure_prepared: demo data, dataset, tokenizer, done marker."""
    _generate_demo(config, log)
    out_dir = prepared_dir(config)
    ds_dir, _ = prepare(config.data_dir, out_dir, stored_image_size=config.stored_image_size,
                        text_source=config.text_source, class_names=tuple(config.class_names),
                        exif_transpose=config.get("exif_transpose", True), log=log)
    if not config.tokenizer:
        get_tokenizer(config, ds_dir)  # trains once, before others may read it
    stored = files.read_json(os.path.join(out_dir, paths.FINGERPRINT_FILE)) or {}
    files.write_json(os.path.join(out_dir, paths.DONE_MARKER),
                     {"dataset_dir": ds_dir, "fingerprint": stored.get("fingerprint")})
    return ds_dir


def ensure_prepared(config, *, timeout_s: float = 7200.0, poll_s: float = 2.0) -> str:
    """Prepares the dataset described by a config if needed; safe on every JAX process.

    Process 0 generates demo data (config.demo.enabled and data_dir new or empty), runs
    `prepare`, trains the demo tokenizer when config.tokenizer is empty and finally writes
    OUT/prepare_done.json atomically. Other processes wait until that marker holds the
    fingerprint of the current raw data and options, so callers need no extra barrier (a stale
    marker never matches).

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
    marker = os.path.join(prepared_dir(config), paths.DONE_MARKER)
    start = time.time()
    while time.time() - start < timeout_s:
        done = files.read_json(marker)
        if done and done.get("fingerprint") == config_fingerprint(config):
            return done["dataset_dir"]
        time.sleep(poll_s)
    raise PrepareError(f"process {jax.process_index()}: no completion marker {marker} after "
                       f"{timeout_s:.0f} s; did process 0 fail to prepare the dataset?")
