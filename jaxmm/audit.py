"""Finds the Train examples whose labels are probably wrong (and suspects in Val and Test).

    python -m jaxmm.audit --config configs/default.py --audit_dir runs/audit [--folds 4]
        [--stage all|plan|score] [-- --config.KEY=VALUE ...]

Trains one ordinary run per fold of Train (``AUDIT_DIR/fold<k>``; finished ones are skipped,
interrupted ones resume), predicts each held-out fold, then writes ``label_issues.csv``,
``summary.json`` and ``label_issues.png`` to AUDIT_DIR. ``--stage plan`` only checks and writes
the folds (``slurm/audit.sh`` then trains them as a job array); ``--stage score`` only scores
finished fold runs. Retrain without the flagged examples with
``--config.exclude_file=AUDIT_DIR/label_issues.csv``. The dataset folder is never written to.
"""

import argparse
import os
import sys

from jaxmm import cli

EXIT_PREEMPTED = 75


def _parse(argv):
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    from jaxmm.evaluation import label_issues

    defaults = label_issues.DEFAULTS
    p = argparse.ArgumentParser(prog="jaxmm.audit", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="config file (all stages but score)")
    p.add_argument("--audit_dir", required=True)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--stage", choices=("all", "plan", "score"), default="all")
    p.add_argument("--filter_by", default=defaults.filter_by, choices=label_issues.FILTER_RULES,
                   help="cleanlab's filter_by (default %(default)s)")
    p.add_argument("--min_score", type=float, default=defaults.min_score,
                   help="keep cleanlab's issues scoring at least this, 1 - p(given label) "
                   "(default %(default)s)")
    p.add_argument("--tower_doubt", type=float, default=defaults.tower_doubt,
                   help="and keep those only where the image alone and the text alone each give "
                   "the label less than this probability (default %(default)s; 1: always)")
    p.add_argument("--conflict_confidence", type=float, default=defaults.conflict_confidence,
                   help="both towers at least this sure for a cross-modal conflict "
                   "(default %(default)s)")
    p.add_argument("--top", type=int, default=16, help="examples in label_issues.png")
    args = p.parse_args(argv)
    for name in ("min_score", "tower_doubt", "conflict_confidence"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name} {getattr(args, name)}: a probability in [0, 1]")
    if args.stage != "score" and not args.config:
        p.error("--config is required (except with --stage score)")
    args.settings = label_issues.Settings(args.filter_by, args.min_score, args.tower_doubt,
                                          args.conflict_confidence)
    return args, common


def _main(argv=None) -> int:
    args, common = _parse(list(sys.argv[1:] if argv is None else argv))
    from absl import flags
    from absl import logging as absl_logging

    from jaxmm.experiments import audit
    from jaxmm.training import parallel

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    parallel.configure_xla("")
    absl_logging.use_absl_handler()  # absl's format and filter, as under app.run
    cli.setup_logging()
    log = lambda line: print(line, flush=True)
    if args.stage != "score":
        runs, _ = audit.plan(args.config, common, args.audit_dir, args.folds, log=log)
        if args.stage == "plan":  # for slurm/audit.sh: the fold runs still to train
            print(",".join(str(r.index) for r in runs if not audit.sweep.is_done(
                os.path.join(args.audit_dir, r.name))))
            return 0
        if audit.train_folds(args.audit_dir, runs, args.config, common, log) == "preempted":
            return EXIT_PREEMPTED
    for line in audit.write_report(args.audit_dir, args.settings, args.top, log=log):
        print(line)
    return 0


def main(argv=None) -> int:
    """Command line (``cli.run_argparse``'s exit codes; 75 = a fold run stopped on a signal)."""
    return cli.run_argparse(_main, "jaxmm.audit", argv)


if __name__ == "__main__":
    sys.exit(main())
