"""Prepare once: raw class folders -> a TFDS ArrayRecord dataset for fast training.

    python -m jaxmm.prepare --data_dir RAW --out_dir OUT [--stored_image_size 256] [--workers K]
        [--text_source filename|caption|both] [--class_names A,B,...] [--image_format jpeg|png]

Writes ``OUT/jaxmm_garbage/1.0.0`` and ``OUT/prepare_report.json`` (counts, skipped files with
reasons, images shared between splits); does nothing when OUT is up to date. The work is done by
``jaxmm.data.prepared``; user errors print one line and exit with status 2.
"""

import argparse
import sys

from jaxmm import cli
from jaxmm.data import captions as captions_lib
from jaxmm.data import prepared


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(description="Prepare the raw dataset once for training.")
    p.add_argument("--data_dir", required=True, help="raw root with CVPR_2024_dataset_* folders")
    p.add_argument("--out_dir", required=True, help="output root")
    p.add_argument("--stored_image_size", type=int, default=256,
                   help="shorter side of the stored images (px); config.stored_image_size")
    p.add_argument("--workers", type=int, default=0, help="decode processes (0 = all cores)")
    p.add_argument("--text_source", default="filename", choices=captions_lib.TEXT_SOURCES)
    p.add_argument("--class_names", default="", help="comma-separated label order")
    p.add_argument("--image_format", default="jpeg", choices=prepared.IMAGE_FORMATS)
    p.add_argument("--exif_transpose", action=argparse.BooleanOptionalAction, default=True,
                   help="turn images upright by their EXIF orientation tag; "
                        "config.exif_transpose")
    return p.parse_args(argv)


def _prepare(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = tuple(n for n in args.class_names.split(",") if n)
    prepared.prepare(args.data_dir, args.out_dir, stored_image_size=args.stored_image_size,
                     workers=args.workers, text_source=args.text_source, class_names=names,
                     image_format=args.image_format, exif_transpose=args.exif_transpose)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``cli.run_argparse``'s exit codes)."""
    return cli.run_argparse(_prepare, "jaxmm.prepare", argv)


if __name__ == "__main__":
    sys.exit(main())
