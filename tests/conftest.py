"""Test setup: fake CPU devices, no network, one compilation cache, parsed absl flags.

The environment variables must be set before JAX is imported anywhere, which is why they are set
at the top of this module (pytest imports conftest first).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# In-process tests use rbg keys; the code under test takes whatever key implementation JAX is
# configured with. What ships is JAX's default, threefry, and the production paths run with it:
# the command-line training runs of test_loop.py (``env(shipped_prng=True)``), the Slurm jobs
# (``Cluster``) and the README demo (test_readme_numbers.py). Measured on the 2-core CPU, threefry
# costs 22 % more CPU time on test_calibrated_evaluation.py (84 vs 68 s) and 9 % on test_loop.py's
# artefact and SIGKILL tests (100 vs 92 s), i.e. a few minutes over the whole suite; the other
# subprocesses inherit rbg.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# One persistent compilation cache for the whole test run, in-process and in every subprocess
# (training runs, Slurm jobs): the many tiny runs compile the same programs, and every program is
# cached, however short its compile (a tiny run's many small programs add up to seconds).
# Tests of where jaxmm itself puts its cache run without it (``without_shared_cache``).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxmm_tests_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402

from tests import support  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Workdir of a tiny demo run trained on 4 fake devices (trained once per pytest run)."""
    from jaxmm.training import loop

    root = tmp_path_factory.getbasetemp() / "tiny_eval_run"
    workdir = str(root / "run")
    if not os.path.exists(os.path.join(workdir, "train_summary.json")):
        loop.train_and_evaluate(support.eval_tiny_config(str(root)), workdir)
    return workdir


@pytest.fixture(scope="session")
def bundle_dir(trained_run, tmp_path_factory):
    """The shared run exported as a bundle without its temperature, so probabilities compare
    with the raw ones of evaluation (calibrated bundles are made where a test needs one)."""
    from jaxmm.trained import bundle

    out = str(tmp_path_factory.mktemp("bundle") / "garbage")
    bundle.export_run(trained_run, out, "best", calibrated=False)
    return out


@pytest.fixture(scope="session")
def explain_bundle_dir(trained_run, tmp_path_factory):
    """The shared run exported with its temperature and the explanation functions (``export
    --explain``), as the server uses it."""
    from jaxmm.trained import bundle

    out = str(tmp_path_factory.mktemp("explain_bundle") / "garbage")
    bundle.export_run(trained_run, out, "best", explain=True)
    return out


@pytest.fixture(scope="session")
def server(explain_bundle_dir, tmp_path_factory):
    """``python -m jaxmm.serve`` on the explanation bundle (loopback, a free port), shared by
    the API and browser tests: batches of up to 8 images that wait up to 5 s for one another
    (so a batch forms by count, not timing), a queue of 8, uploads up to 2 MiB. Its temporary
    folder and working folder are empty ones of its own (``tmp``, ``cwd``)."""
    root = tmp_path_factory.mktemp("server")
    (root / "tmp").mkdir()
    (root / "cwd").mkdir()
    environ = dict(support.env(1), TMPDIR=str(root / "tmp"))
    srv = support.Server(explain_bundle_dir, "--max_batch", "8", "--max_wait_ms", "5000",
                         "--max_queue", "8", "--max_upload_mb", "2", "--unsure_below", "0.6",
                         cwd=str(root / "cwd"), environ=environ)
    srv.root = root
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def test_split(trained_run):
    """The test split of the shared run as jaxmm's evaluation sees it: each example's raw file,
    text and raw (uncalibrated) probabilities of the best checkpoint."""
    from jaxmm.evaluation import report as eval_report
    from jaxmm.trained.workdir import Workdir
    from jaxmm.training import parallel

    wd = Workdir(trained_run)
    trained = wd.load_model("best", axis_name=parallel.AXIS_NAME, calibrated=False)
    evaluator = eval_report.open_split(wd, trained, "test")
    _, predictions = evaluator(parallel.put_replicated(trained.variables), collect=True)
    data_dir = wd.config().data_dir
    records = [evaluator.source[int(i)] for i in predictions["index"]]
    files = [os.path.join(data_dir, r["file_name"].decode()) for r in records]
    texts = [r["text"].decode() for r in records]
    return files, texts, predictions["probs"]
