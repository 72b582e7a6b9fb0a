"""Shared plumbing of the command-line entry points: one-line errors instead of tracebacks for
user mistakes, and quiet logging on processes other than 0.

Every entry point, absl or argparse, runs through ``run`` or ``run_argparse`` and keeps one
exit-code rule: 0 done, 1 a user error (one line: "<prog>: error: ..."), 2 a bad flag or
argument, 75 stopped by a signal after saving (training). Only the project's own user-error types
(``jaxmm.errors.UserError``) become one line; any other exception is a bug (or an unexpected
failure) and keeps its traceback.
"""

import contextlib
import logging as std_logging
import os
import sys

from absl import app, flags, logging

from jaxmm.errors import UserError

# Exceptions that mean "the input, the config or the environment is wrong" (or "the run
# diverged"), not "jaxmm has a bug".
USER_ERRORS = (UserError,)
_HINT = "  (JAXMM_TRACEBACK=1 shows the traceback)"


def _one_line(prog: str, error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{prog}: error: {text}"


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")


def _parse_flags(argv):
    """absl flag parsing that reports a bad flag or config key on one line, and ``--help``
    that lists the command's own flags and exits 0."""
    prog = os.path.basename(argv[0]) if argv else "jaxmm"
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(_one_line(prog, _config_key_error(e)), file=sys.stderr)
        sys.exit(2)


def _config_key_error(error: BaseException) -> BaseException | str:
    """ml_collections reports a mistyped ``--config.key`` as a KeyError or AttributeError
    whose text is the repr of "'key'\\nDid you mean ...": say it in words."""
    if isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
        error = error.args[0]  # ml_collections wraps the KeyError
    if isinstance(error, (KeyError, AttributeError)) and error.args and isinstance(
            error.args[0], str) and "Did you mean" in error.args[0]:
        key, _, hint = error.args[0].partition("\n")
        return f"unknown config key {key} ({hint.strip()})"
    if isinstance(error, KeyError) and error.args:
        return f"unknown config key {error.args[0]!r}"
    return error


def help_text() -> str:
    """The running command's description (its module docstring) and its own flags."""
    main = sys.modules.get("__main__")
    doc = (getattr(main, "__doc__", None) or "").strip()
    by_module = flags.FLAGS.flags_by_module_dict()
    # absl files the flags of ``python -m`` under the script's path, else the module name.
    main_file = os.path.abspath(getattr(main, "__file__", None) or "-")
    own = [m for m in by_module if m.split(".")[0] == "jaxmm"
           or os.path.abspath(m) == main_file]
    listed = "\n".join(flags.FLAGS.module_help(m) for m in own)
    return f"{doc}\n\nflags:\n{listed}\n\n(--helpfull lists every flag, the libraries' too)"


def run(main, prog: str) -> None:
    """Runs ``main(argv)`` under absl with one-line user errors (exit code 2 for flags, 1 else).

    Set ``JAXMM_TRACEBACK=1`` to see the full traceback of a user error.
    """
    def wrapped(argv):
        with user_errors(prog):
            return main(argv)

    sys.argv[0] = prog
    app.run(wrapped, flags_parser=_parse_flags)


def run_argparse(main, prog: str, argv=None) -> int:
    """Runs an argparse entry point ``main(argv) -> int | None`` under the exit-code rule.

    Returns:
      The exit code (argparse itself exits 2 on a bad argument; a user error exits 1).
    """
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        if os.environ.get("JAXMM_TRACEBACK"):
            raise
        print(_one_line(prog, e) + _HINT, file=sys.stderr)
        return 1


@contextlib.contextmanager
def user_errors(prog: str):
    """Turns USER_ERRORS into one line on stderr and exit code 1."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("JAXMM_TRACEBACK"):
            raise
        print(_one_line(prog, e) + _HINT, file=sys.stderr)
        sys.exit(1)


class _OwnInfoOnly:
    """Keeps INFO lines of jaxmm itself (its ``jaxmm`` logger); libraries (orbax and grain log
    through absl's logger) only speak up for warnings, wherever they are installed."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or record.name == "jaxmm" or (
            record.name.startswith("jaxmm."))


def define_distributed_flags() -> None:
    """Flags for a multi-process run started by hand (Slurm's srun needs none of them)."""
    flags.DEFINE_string("coordinator_address", "",
                        "host:port of process 0 for a multi-process run outside Slurm.")
    flags.DEFINE_integer("num_processes", 0, "Processes of a multi-process run.")
    flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")


def initialize_distributed(compilation_cache_dir: str = "") -> None:
    """Sets XLA options, starts jax.distributed from the flags above, the JAX_* variables or an
    srun step, then sets up logging. Call it first in ``main``, before anything touches a
    device."""
    from jaxmm.training import parallel

    f = flags.FLAGS
    parallel.configure_xla(compilation_cache_dir)
    parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    setup_logging()


def setup_logging() -> None:
    """INFO logs on process 0, warnings only elsewhere (call after distributed init)."""
    import jax

    level = std_logging.INFO if jax.process_index() == 0 else std_logging.WARNING
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    std_logging.getLogger("jaxmm").setLevel(level)
