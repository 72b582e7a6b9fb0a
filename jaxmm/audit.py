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
    p = argparse.ArgumentParser(prog="jaxmm.audit", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="config file (all stages but score)")
    p.add_argument("--audit_dir", required=True)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--stage", choices=("all", "plan", "score"), default="all")
    p.add_argument("--filter_by", default=None, help="cleanlab's filter_by (default: the "
                   "module's FILTER_BY)")
    p.add_argument("--min_score", type=float, default=None,
                   help="keep cleanlab's issues scoring at least this (1 - p(given label))")
    p.add_argument("--conflict_confidence", type=float, default=None,
                   help="both towers at least this sure for a cross-modal conflict")
    p.add_argument("--top", type=int, default=16, help="examples in label_issues.png")
    args = p.parse_args(argv)
    if args.stage != "score" and not args.config:
        p.error("--config is required (except with --stage score)")
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
    for line in audit.write_report(args.audit_dir, args.filter_by, args.conflict_confidence,
                                   args.top, log=log, min_score=args.min_score):
        print(line)
    return 0


def main(argv=None) -> int:
    """Command line (``cli.run_argparse``'s exit codes; 75 = a fold run stopped on a signal)."""
    return cli.run_argparse(_main, "jaxmm.audit", argv)


if __name__ == "__main__":
    sys.exit(main())
