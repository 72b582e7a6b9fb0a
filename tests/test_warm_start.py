"""Warm start from another run's checkpoint: the exact weights and BatchNorm statistics come
back; another class list or architecture is refused in one line that says what differs."""


import jax
import numpy as np
import pytest

from configs import demo
from jaxmm import models
from jaxmm.errors import ConfigError, WorkdirError
from jaxmm.trained.model import ModelSpec, Preprocessing
from jaxmm.trained.workdir import Workdir, model_architecture
from jaxmm.training import checkpointing, warm_start

CLASSES = ["Black", "Blue", "Green", "TTR"]
VOCAB = 64


def _model(config):
    return models.build_model(config.model, len(CLASSES), VOCAB, axis_name=None)


def _variables(config, seed=0):
    """Random values in the model's variable shapes (tracing only: no slow initialisation)."""
    model = _model(config)
    shapes = jax.eval_shape(lambda: models.init_variables(
        model, jax.random.PRNGKey(0), config.image_size, config.max_text_length))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                        {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})


def _config(**model):
    c = demo.get_config()
    c.image_size, c.max_text_length = 32, 8
    c.model.proj_dim = c.model.hidden_dim = 16
    c.model.update(model)
    return c


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A workdir with a best checkpoint (step 7) and a latest one (step 9)."""
    workdir = tmp_path_factory.mktemp("source")
    config = _config()
    best, latest = _variables(config, 1), _variables(config, 2)
    Workdir(str(workdir)).write_record({
        "config": config.to_dict(), "class_names": CLASSES,
        "model": ModelSpec(tuple(CLASSES), model_architecture(_model(config), config),
                           Preprocessing(stored_size=40, crop_size=config.image_size,
                                         max_text_length=config.max_text_length)).to_json()})
    ckpts = checkpointing.Checkpoints(str(workdir), 1)
    ckpts.save_best(7, best, {"epoch": 1})
    ckpts.save(9, {"step": np.int32(9), **latest, "opt_state": {}}, {}, {"epoch": 2})
    ckpts.close()
    return str(workdir), best, latest


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_parse_spec():
    assert warm_start.parse_spec("runs/a") == ("runs/a", "best")
    assert warm_start.parse_spec("runs/a:latest") == ("runs/a", "latest")
    assert warm_start.parse_spec("runs/a:120") == ("runs/a", "120")
    assert warm_start.parse_spec("/x/b:c") == ("/x/b:c", "best")


def test_loads_best_latest_and_a_step(source):
    workdir, best, latest = source
    config = _config()
    template = _variables(config, 0)
    loaded, step = warm_start.load(workdir, _model(config), config, CLASSES, template)
    assert step == 7
    _equal(loaded, best)
    assert jax.tree.leaves(loaded["batch_stats"])  # the tiny image tower has BatchNorm
    for spec in (f"{workdir}:latest", f"{workdir}:9"):
        loaded, step = warm_start.load(spec, _model(config), config, CLASSES, template)
        assert step == 9
        _equal(loaded, latest)


@pytest.mark.parametrize("change, message", [
    ({"fusion": "gated"}, r"model.fusion: 'concat' vs 'gated'; \d+ parameter\(s\) missing"),
    ({"proj_dim": 8}, r"model.proj_dim: 16 vs 8; \d+ shape\(s\) differ \(e.g. .*\(16, 16\)"),
    ({"modalities": ("text",)}, r"model.modalities: \['image', 'text'\] vs \['text'\]"),
])
def test_another_architecture_is_refused(source, change, message):
    config = _config(**change)
    with pytest.raises(ConfigError, match="the architecture differs from this run's: " + message):
        warm_start.load(source[0], _model(config), config, CLASSES, _variables(config))


def test_another_class_list_or_a_missing_run_is_refused(source, tmp_path):
    config = _config()
    template = _variables(config)
    with pytest.raises(ConfigError, match=r"class list differs \(only here \['Other'\], only "
                                         r"there \['TTR'\]\)"):
        warm_start.load(source[0], _model(config), config, [*CLASSES[:3], "Other"],
                        template)
    with pytest.raises(ConfigError, match="same classes in another order"):
        warm_start.load(source[0], _model(config), config, CLASSES[::-1], template)
    with pytest.raises(WorkdirError, match="has no readable config.json"):
        warm_start.load(str(tmp_path), _model(config), config, CLASSES, template)
    with pytest.raises(WorkdirError, match="no '5' checkpoint"):
        warm_start.load(f"{source[0]}:5", _model(config), config, CLASSES, template)
