"""The demo numbers README.md quotes, measured with the quick-start commands.

    python benchmarks/demo_numbers.py                      # seed 0: prints the numbers
    python benchmarks/demo_numbers.py --check README.md    # exit 1 when README disagrees
    python benchmarks/demo_numbers.py --update README.md   # writes seed 0's numbers into README
    python benchmarks/demo_numbers.py --seeds 0 1 2        # the per-seed table behind the means

Each seed runs, in a fresh process and a fresh ``JAXMM_CACHE`` (so the demo data are generated
and prepared anew), exactly the quick start: ``python -m jaxmm.train --config configs/demo.py``
then ``python -m jaxmm.evaluate --split test --ablation``, on the CPU's single JAX device, with
JAX's default (threefry) random numbers, as a user gets them. README's seed-0 sentence and its
calibration paragraph are read with the patterns below, so the check and the update cannot
drift from the text. ``tests/test_readme_numbers.py`` runs ``--check`` in CI.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What README may differ by from a fresh run (CPUs round differently, and the errors compound
# over 10 epochs of training): two examples of validation (42) or test (41) for accuracies,
# 0.10 for the temperature, 0.03 for NLL and ECE.
TOLERANCE = {"val_accuracy": 2 / 42, "test_accuracy": 2 / 41, "temperature": 0.10,
             "nll": 0.03, "ece": 0.03}

_NUM = r"([0-9]+\.[0-9]+)"
# README text -> the names of the numbers it holds, in order.
PATTERNS = {
    "seed0": (rf"Seed 0 \(the default\) gives best validation accuracy {_NUM} and test "
              rf"accuracy {_NUM}", ("val_accuracy", "test_accuracy")),
    "calibration": (rf"validation has ([0-9]+) examples; the fitted temperature is {_NUM}: "
                    rf"validation NLL {_NUM} → {_NUM}, ECE {_NUM} → {_NUM}; on the test split "
                    rf"\(raw\) NLL {_NUM}, ECE {_NUM}",
                    ("val_examples", "temperature", "val_nll_raw", "val_nll_cal", "val_ece_raw",
                     "val_ece_cal", "test_nll_raw", "test_ece_raw")),
}
_DIGITS = {"val_accuracy": 3, "test_accuracy": 3, "temperature": 2, "val_examples": 0}


def clean_env(cache: str) -> dict:
    """The environment of a user's shell: no test-suite settings (device count, PRNG)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_DEFAULT_PRNG_IMPL", "JAX_ENABLE_X64")}
    env.update(JAXMM_CACHE=cache, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return env


def run_seed(seed: int, work: str) -> dict:
    """Trains and evaluates the demo with ``seed``; returns the numbers README quotes."""
    workdir, env = os.path.join(work, f"demo_seed{seed}"), clean_env(os.path.join(work, "cache"))
    for module, args in (("jaxmm.train", ["--config", "configs/demo.py",
                                          f"--config.seed={seed}"]),
                         ("jaxmm.evaluate", ["--split", "test", "--ablation"])):
        out = subprocess.run([sys.executable, "-m", module, "--workdir", workdir, *args],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode:
            raise SystemExit(f"{module} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    read = lambda *p: json.load(open(os.path.join(workdir, *p)))
    summary, cal = read("train_summary.json"), read("calibration.json")
    test = read("eval", "best", "test", "metrics.json")
    applied = cal.get("applied", True)
    if bool(test["calibration"].get("calibrated")) != applied:
        raise SystemExit(f"seed {seed}: calibration.json says applied={applied} but evaluation "
                         f"{'did not apply' if applied else 'applied'} it ({workdir})")
    alone = {"+".join(r["modalities"]): r["accuracy"]
             for r in read("eval", "best", "test", "ablation.json")["rows"]}
    return {"seed": seed, "val_accuracy": summary["best_validation"]["accuracy"],
            "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "val_examples": cal["num_examples"], "temperature": cal["temperature"],
            "temperature_applied": applied, "temperature_reason": cal.get("reason"),
            "val_nll_raw": cal["before"]["nll"], "val_nll_cal": cal["after"]["nll"],
            "val_ece_raw": cal["before"]["ece"], "val_ece_cal": cal["after"]["ece"],
            "test_nll_raw": test["calibration"]["raw"]["nll"],
            "test_ece_raw": test["calibration"]["raw"]["ece"],
            "test_image_only": alone["image"], "test_text_only": alone["text"],
            # What always answering the largest class scores (the data, not the model).
            **{f"{short}_largest_class": max(n.values()) / sum(n.values())
               for split, short in (("validation", "val"), ("test", "test"))
               for n in [read("config.json")["data"]["counts"][split]]}}


def readme_numbers(text: str) -> dict:
    """The numbers of README's seed-0 sentence and calibration paragraph, by name."""
    found = {}
    for what, (pattern, names) in PATTERNS.items():
        m = re.search(pattern, " ".join(text.split()))
        if not m:
            raise SystemExit(f"README.md: the {what} sentence is not where the pattern of "
                             f"benchmarks/demo_numbers.py expects it: {pattern}")
        found.update(zip(names, map(float, m.groups()), strict=True))
    return found


def tolerance(name: str) -> float:
    if name == "val_examples":
        return 0.0
    return TOLERANCE.get(name) or TOLERANCE[name.split("_")[1]]


def differences(readme: dict, measured: dict) -> list[str]:
    """README numbers farther from the measured ones than their tolerance."""
    return [f"{k}: README {v:g}, measured {measured[k]:.4f} (tolerance {tolerance(k):.3f})"
            for k, v in readme.items() if abs(v - measured[k]) > tolerance(k) + 1e-9]


def fmt(name: str, value: float) -> str:
    digits = _DIGITS.get(name, 3)
    return str(int(round(value))) if digits == 0 else f"{value:.{digits}f}"


def update(text: str, measured: dict) -> str:
    """``text`` with each quoted number replaced by the measured one."""
    flat = " ".join(text.split())
    for pattern, names in PATTERNS.values():
        m = re.search(pattern, flat)
        if not m:
            raise SystemExit(f"README.md: no match for {pattern}")
        new = m[0]
        for i, name in reversed(list(enumerate(names, 1))):
            s, e = m.start(i) - m.start(0), m.end(i) - m.start(0)
            new = new[:s] + fmt(name, measured[name]) + new[e:]
        # Back in the wrapped text: the sentence may span lines; match it with any whitespace.
        wrapped = re.compile(r"\s+".join(map(re.escape, m[0].split())))
        text = wrapped.sub(lambda _, new=new: _rewrap(_.group(0), new), text, count=1)
    return text


def _rewrap(old: str, new: str) -> str:
    """``new`` with line breaks where ``old`` had them (same word count)."""
    old_words, new_words = old.split(), new.split()
    if len(old_words) != len(new_words):
        return new
    breaks = re.findall(r"\s+", old)
    return "".join(w + (breaks[i] if i < len(breaks) else "") for i, w in enumerate(new_words))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--check", metavar="README", help="compare seed 0 with README's numbers")
    p.add_argument("--update", metavar="README", help="write seed 0's numbers into README")
    p.add_argument("--work_dir", default="", help="where the runs go (default: a temp folder)")
    args = p.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="jaxmm_demo_numbers_")
    rows = [run_seed(s, work) for s in args.seeds]
    for row in rows:
        print(json.dumps(row))
    if len(rows) > 1:
        for key in ("val_accuracy", "test_accuracy", "test_macro_f1", "test_image_only",
                    "test_text_only"):
            values = [r[key] for r in rows]
            print(f"{key}: mean {sum(values) / len(values):.3f} "
                  f"(range {min(values):.3f}-{max(values):.3f})")
    seed0 = next((r for r in rows if r["seed"] == 0), None)
    if (args.check or args.update) and seed0 is None:
        raise SystemExit("--check and --update need seed 0 among --seeds")
    if args.update:
        with open(args.update, encoding="utf-8") as f:
            text = update(f.read(), seed0)
        with open(args.update, "w", encoding="utf-8") as f:
            f.write(text)
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            bad = differences(readme_numbers(f.read()), seed0)
        for line in bad:
            print(f"{args.check}: {line}", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
