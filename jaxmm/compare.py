"""Compares training runs: one table of status, best validation and test metrics, throughput.

    python -m jaxmm.compare DIR... [--sort val_macro_f1] [--out DIR] [--stale_minutes 30]

Each DIR is a workdir, a sweep folder (slurm/sweep.sh) or a folder of workdirs. Prints the
table, writes comparison.csv, comparison.md and comparison.png (validation curves) to ``--out``
(default: DIR when only one is given, else the current folder). Runs still going and runs with
missing files are listed with what could be read, and a note.
"""

from absl import flags

from jaxmm import cli
from jaxmm.errors import ConfigError, WorkdirError

_SORT = flags.DEFINE_string("sort", "", "Column to sort by, best first (default: val_<the "
                            "early-stopping metric>); losses sort ascending.")
_OUT = flags.DEFINE_string("out", "", "Folder for comparison.{csv,md,png}.")
_STALE = flags.DEFINE_float("stale_minutes", 30.0, "A run with no summary counts as running "
                            "while it wrote a file within this many minutes, else as failed.")


def main(argv):
    from jaxmm.experiments import run_table

    dirs = argv[1:]
    if not dirs:
        raise ConfigError("give one or more workdirs or sweep folders")
    runs, notes = run_table.find_runs(dirs)
    if not runs:
        raise WorkdirError(f"no runs found in {' '.join(dirs)}")
    rows = [run_table.read_run(r, _STALE.value * 60) for r in runs]
    run_table.add_overrides(rows)
    configs = [r["_config"] for r in rows if r["_config"]]
    metric = configs[0].get("early_stopping_metric", "macro_f1") if configs else "macro_f1"
    sort = _SORT.value or f"val_{metric}"
    rows = run_table.sort_rows(rows, sort)
    columns = run_table.short_columns(sort)
    print(run_table.text_table(rows, columns))
    notes += [f"{r['run']}: {n}" for r in rows for n in r["notes"]]
    for note in notes:
        print(f"note: {note}")
    out = _OUT.value or (dirs[0] if len(dirs) == 1 else ".")
    for path in run_table.write_outputs(rows, out, metric, columns):
        print(f"wrote {path}")


def run():
    """Console-script entry point (``jaxmm-compare``)."""
    cli.run(main, "jaxmm.compare")


if __name__ == "__main__":
    run()
