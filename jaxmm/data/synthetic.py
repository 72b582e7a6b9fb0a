"""A look-alike of the garbage dataset for demos, tests and benchmarks.

Writes ``CVPR_2024_dataset_{Train,Val,Test}/<Class>/<files>`` and ``train_image_descriptions.csv``
with the real quirks: messy file names (mixed case, inner spaces, hyphens, no number suffix,
``bag _10.png``), names shared by two classes, the real Train class imbalance and a shifted Test
split, mostly PNG with some JPEG and RGBA files, photo-like texture, and colours/shapes that
correlate with the class so an image-only model beats chance. Deterministic for a seed. Writes
only into a new or empty folder (never among files of a real dataset).

    python -m jaxmm.data.synthetic --out DIR [--per_class N | --real_size] [--seed S]
        [--max_side PX] [--label_noise P]

``--real_size`` writes as many files per split and class as the real dataset (15,431, about
1 MB each at the default 1024 px: ~15 GB), for measuring the whole workflow at full size.

With ``--label_noise P`` a fraction P of the Train files (chosen deterministically from the
seed) is drawn and described as one class and filed under another: wrong labels, as people
sorting photos into bins make them. Which files were flipped is written to
``TRUTH_FILE`` (file, given, true) beside the split folders; jaxmm itself never reads it (the
label-audit measurement in benchmarks/ does).
"""

import argparse
import multiprocessing as mp
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from jaxmm import files
from jaxmm.errors import PrepareError

SPLITS = ("Train", "Val", "Test")
CLASSES = ("Black", "Blue", "Green", "TTR")

# Item names per class as they appear in real file names. The last two of each list are rare in
# Train/Val and common in Test, which shifts the Test text distribution like the real one.
ITEMS = {
    "Black": ["chip bag", "Styrofoam cup", "plastic spoon", "diaper", "bag ", "face mask",
              "Candy_Wrapper", "straw", "toothbrush", "non-stretchy plastic", "cigarette butt",
              "rubber glove", "Coffee_Cup_Lid", "bubble wrap"],
    "Blue": ["Plastic_Bottle", "aluminum can", "cardboard box", "newspaper", "glass jar",
             "milk jug", "Soup Can", "plastic spoon", "paper bag", "tin foil", "yogurt container",
             "magazine", "Pizza_Box", "egg carton"],
    "Green": ["banana peel", "apple core", "coffee grounds", "egg shells", "tea bag",
              "paper towel", "Orange_Peel", "food scraps", "bread", "lettuce", "corn cob",
              "napkin", "Pizza_Box", "leaves"],
    "TTR": ["battery", "light bulb", "phone charger", "paint can", "Electronics", "cell phone",
            "printer cartridge", "medication", "nail polish", "spray can", "USB cable",
            "headphones", "Vape_Pen", "thermometer"],
}
# Real Train/Val class shares (Black, Blue, Green, TTR) and the shifted Test shares.
TRAIN_SHARE = (0.207, 0.427, 0.195, 0.171)
TEST_SHARE = (0.203, 0.316, 0.233, 0.248)
SPLIT_SCALE = {"Train": 1.0, "Val": 0.18, "Test": 0.34}
# Files per class (Black, Blue, Green, TTR) of one offering of the real dataset: 15,431 in all.
REAL_COUNTS = {"Train": (2111, 4355, 1991, 1743), "Val": (372, 768, 352, 308),
               "Test": (695, 1085, 799, 852)}

# Class appearance: base RGB colour of the object and a shape; the background is shared.
_STYLE = {"Black": ((40, 40, 45), "ellipse"), "Blue": ((40, 90, 200), "rectangle"),
          "Green": ((60, 160, 60), "ellipse"), "TTR": ((200, 90, 30), "polygon")}
_CAPTION_TEMPLATES = ("A {} sitting on top of a table.", "A close up of a {} on a table.",
                      "A {} on a white background.", "A picture of a {}.")
# Captions CSVs of the real data hold absolute paths of the cluster they were made on.
_FOREIGN_ROOT = "/cluster/courses/ml645/garbage_data"
# Like the real data, neither modality is perfect: some objects look like another bin's (the
# image then misleads), and some texts are items that belong to another bin's list (the text
# then misleads). With these rates a model needs both towers to do well.
_STYLE_NOISE = 0.35
_TEXT_NOISE = 0.12
TRUTH_FILE = "label_noise_truth.csv"  # written with --label_noise; never read by jaxmm


def class_counts(per_class: int, split: str, real_size: bool = False) -> list[int]:
    """Files per class of a split (at least 2 each), imbalanced like the real data; with
    ``real_size`` the real dataset's own counts (``REAL_COUNTS``), whatever ``per_class``."""
    if real_size:
        return list(REAL_COUNTS[split])
    share = TEST_SHARE if split == "Test" else TRAIN_SHARE
    total = per_class * len(CLASSES) * SPLIT_SCALE[split]
    return [max(2, round(total * s)) for s in share]


def _file_name(item: str, k: int, rng: np.random.Generator, used: set) -> str:
    """A real-looking file name for the k-th file of an item, unique within its folder."""
    style = rng.integers(0, 6)
    # A trailing space is kept (the real "bag _10.png" quirk) unless the name gets underscores.
    base = item if item.endswith(" ") and style != 1 else item.strip()
    if style == 1:
        base = base.replace(" ", "_")
    elif style == 2:
        base = base.title()
    elif style == 3:
        base = base.lower()
    ext = ".jpg" if rng.random() < 0.1 else ".png"
    name = f"{base}{ext}" if k == 0 and rng.random() < 0.5 else f"{base}_{k + 1}{ext}"
    while name in used:
        name = f"{base}_{k + 1}_{len(used)}{ext}"
    used.add(name)
    return name


def _plan(per_class: int, seed: int, max_side: int, real_size: bool = False) -> list[tuple]:
    """Every file to write: (split, class, file name, item, image seed, size, rgba)."""
    rng = np.random.default_rng(seed)
    plan = []
    for split in SPLITS:
        for cls, count in zip(CLASSES, class_counts(per_class, split, real_size), strict=True):
            items = ITEMS[cls]
            weights = np.ones(len(items))
            weights[-2:] = 4.0 if split == "Test" else 0.3
            picks = rng.choice(len(items), size=count, p=weights / weights.sum())
            used, seen = set(), {}
            for idx in picks:
                item = items[idx]
                if rng.random() < _TEXT_NOISE:
                    other = ITEMS[CLASSES[rng.integers(len(CLASSES))]]
                    item = other[rng.integers(len(other))]
                k = seen.get(item, 0)
                seen[item] = k + 1
                name = _file_name(item, k, rng, used)
                side = max_side if rng.random() < 0.7 else int(max_side * rng.uniform(0.5, 1.0))
                other = side if rng.random() < 0.6 else int(side * rng.uniform(0.6, 1.0))
                size = (side, other) if rng.random() < 0.5 else (other, side)
                rgba = name.endswith(".png") and rng.random() < 0.15
                plan.append((split, cls, name, item, int(rng.integers(2**31)), size, rgba))
    return plan


def flip_labels(plan: list[tuple], fraction: float, seed: int) -> tuple[list[tuple], list]:
    """Files a deterministic ``fraction`` of the Train entries of ``plan`` under another class.

    The image and the text stay those of the true class (entry index 1 becomes the folder's
    class, and the true class is appended to the entry).

    Returns:
      (new plan, [dict(file, given, true)] of the flipped Train files).
    """
    if not 0.0 <= fraction < 1.0:
        raise PrepareError(f"--label_noise {fraction}: a fraction in [0, 1)")
    rng = np.random.default_rng([seed, 7])
    train = [i for i, p in enumerate(plan) if p[0] == "Train"]
    chosen = set(rng.choice(train, size=round(fraction * len(train)), replace=False).tolist())
    used = {(p[0], p[1], p[2]) for p in plan}
    out, truth = [], []
    for i, (split, cls, name, *rest) in enumerate(plan):
        given = cls
        if i in chosen:
            given = CLASSES[(CLASSES.index(cls) + int(rng.integers(1, len(CLASSES))))
                            % len(CLASSES)]
            stem, ext = os.path.splitext(name)
            while (split, given, name) in used:  # never clash with a name in the other folder
                stem += "_x"
                name = stem + ext
            used.add((split, given, name))
            truth.append({"file": f"CVPR_2024_dataset_{split}/{given}/{name}", "given": given,
                          "true": cls})
        out.append((split, given, name, *rest, cls))
    return out, truth


def render(cls: str, seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image whose object colour and shape depend on the class.

    Args:
      cls: class name (its style picks colour and shape).
      seed: image seed.
      size: (width, height).

    Returns:
      The image: smooth lit background, a class-coloured object, sensor-like noise.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    low = rng.integers(150, 240, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    if rng.random() < _STYLE_NOISE:
        cls = CLASSES[rng.integers(len(CLASSES))]
    colour, shape = _STYLE.get(cls, ((128, 128, 128), "ellipse"))
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colour)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    rx, ry = w * rng.uniform(0.15, 0.3), h * rng.uniform(0.15, 0.3)
    box = (cx - rx, cy - ry, cx + rx, cy + ry)
    draw = ImageDraw.Draw(img)
    if shape == "polygon":
        draw.polygon([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], fill=colour)
    else:
        getattr(draw, shape)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1, min(w, h) // 200)))
    # Fine noise makes files compress like photos (~1 MB PNG at 1024 px) instead of flat colour.
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.integers(-6, 7, size=(h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def _write_one(args: tuple) -> None:
    """Pool worker: renders and saves one planned file."""
    out_dir, (split, cls, name, _, img_seed, size, rgba, *true) = args
    img = render(true[0] if true else cls, img_seed, size)
    path = os.path.join(out_dir, f"CVPR_2024_dataset_{split}", cls, name)
    if name.endswith(".jpg"):
        img.save(path, quality=90)
    else:
        if rgba:
            img = img.convert("RGBA")
        img.save(path, compress_level=1)


def _write_captions(out_dir: str, plan: list[tuple], seed: int) -> None:
    """Writes train_image_descriptions.csv with foreign absolute paths and ~5% rows missing."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for split, cls, name, item, *_ in plan:
        if split != "Train" or rng.random() < 0.05:
            continue
        words = item.strip().replace("_", " ").lower()
        caption = _CAPTION_TEMPLATES[rng.integers(len(_CAPTION_TEMPLATES))].format(words)
        rows.append({"image": f"{_FOREIGN_ROOT}/CVPR_2024_dataset_{split}/{cls}/{name}",
                     "description": caption})
    files.write_csv(os.path.join(out_dir, "train_image_descriptions.csv"), rows,
                    ["image", "description"])


def check_target(out_dir: str) -> None:
    """Raises PrepareError unless out_dir is absent or an empty folder."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise PrepareError(f"{out_dir} exists and is not a folder; synthetic data is generated "
                           "only into a new or empty folder")
    if os.listdir(out_dir):
        raise PrepareError(f"{out_dir} is not empty and holds no dataset (no "
                           "CVPR_2024_dataset_Train); synthetic data is generated only into a new "
                           "or empty folder: check the data_dir path or empty the folder")


def generate(out_dir: str, per_class: int = 40, seed: int = 0, max_side: int = 1024,
             workers: int | None = None, label_noise: float = 0.0,
             real_size: bool = False) -> str:
    """Writes the synthetic dataset into a new or empty folder.

    The files are written into a sibling folder first and renamed to out_dir at the end, so an
    interrupted run leaves out_dir without a dataset (and the next run starts again).

    Args:
      out_dir: root to write: absent (it is created) or an empty folder.
      per_class: average Train files per class (Val/Test are ~18%/34% of Train).
      seed: generation seed; equal seeds give identical files.
      max_side: longest image side in pixels.
      workers: processes used to render (default: all cores).
      label_noise: fraction of Train files filed under a wrong class (``flip_labels``); the
        truth goes to ``TRUTH_FILE``.
      real_size: as many files per split and class as the real dataset (``REAL_COUNTS``,
        15,431 files, about 15 GB at the default max_side); per_class is then ignored.

    Returns:
      out_dir.

    Raises:
      PrepareError: out_dir exists and is not an empty folder.
    """
    check_target(out_dir)
    final, out_dir = out_dir, f"{os.path.normpath(out_dir)}.partial-{os.getpid()}"
    shutil.rmtree(out_dir, ignore_errors=True)
    plan = _plan(per_class, seed, max_side, real_size)
    if label_noise:
        plan, truth = flip_labels(plan, label_noise, seed)
    for split in SPLITS:
        for cls in CLASSES:
            os.makedirs(os.path.join(out_dir, f"CVPR_2024_dataset_{split}", cls), exist_ok=True)
    tasks = [(out_dir, p) for p in plan]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(tasks) > 16:
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_one, tasks, chunksize=8)
    else:
        for t in tasks:
            _write_one(t)
    _write_captions(out_dir, plan, seed)
    if label_noise:
        files.write_csv(os.path.join(out_dir, TRUTH_FILE), truth, ["file", "given", "true"])
    os.replace(out_dir, final)  # also replaces an empty folder
    return final


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output root directory")
    parser.add_argument("--per_class", type=int, default=40, help="average Train files per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_side", type=int, default=1024, help="longest side in pixels")
    parser.add_argument("--real_size", action="store_true",
                        help="the real dataset's file counts per split and class (15,431 "
                             "files, ~15 GB at 1024 px); --per_class is then ignored")
    parser.add_argument("--label_noise", type=float, default=0.0,
                        help=f"fraction of Train files filed under a wrong class (truth in "
                             f"{TRUTH_FILE})")
    args = parser.parse_args(argv)
    generate(args.out, args.per_class, args.seed, args.max_side, label_noise=args.label_noise,
             real_size=args.real_size)
    count = len(_plan(args.per_class, args.seed, args.max_side, args.real_size))
    print(f"wrote {count} images to {args.out}"
          + (f"; wrong Train labels listed in {TRUTH_FILE}" if args.label_noise else ""))


if __name__ == "__main__":
    from jaxmm import cli

    sys.exit(cli.run_argparse(main, "jaxmm.data.synthetic"))
