"""Config checks of setup_lib.validate_config: every bad value is one ConfigError naming its key,
raised before any data is prepared."""

import os

import numpy as np
import pytest

from jaxmm.errors import ConfigError, UserError
from jaxmm.training import losses
from jaxmm.training import setup as setup_lib


def _config(**overrides):
    from configs import default

    c = default.get_config()
    c.data_dir = "/data/garbage"
    for key, value in overrides.items():
        c[key] = value
    return c


def test_default_config_passes():
    setup_lib.validate_config(_config())


@pytest.mark.parametrize("key", setup_lib.POSITIVE_INTS + setup_lib.NON_NEGATIVE_INTS)
def test_whole_number_keys_are_checked(key):
    bad = [-1] + ([0] if key in setup_lib.POSITIVE_INTS else [])
    for value in bad:
        with pytest.raises(ConfigError, match=f"^config.{key}={value} must be") as err:
            setup_lib.validate_config(_config(**{key: value}))
        assert "\n" not in str(err.value) and isinstance(err.value, UserError)


def test_class_weights_from_the_command_line_and_their_errors():
    names, counts = ["Black", "Blue", "Green", "TTR"], {"Black": 2, "Blue": 4}
    for text in ("1.2,0.6,1.3,1.5", "[1.2, 0.6, 1.3, 1.5]", "1.2 0.6 1.3 1.5"):
        setup_lib.validate_config(_config(class_weights=text))  # what --config.x=... gives
        np.testing.assert_allclose(losses.resolve_class_weights(text, names, counts),
                                   [1.2, 0.6, 1.3, 1.5])
    for text, match in (("1,2,x,4", "positive numbers"), ("1,0,1,1", "positive numbers"),
                        ("inverse", "expected 'balanced'")):
        with pytest.raises(ConfigError, match=match):
            setup_lib.validate_config(_config(class_weights=text))
    with pytest.raises(ConfigError, match="3 numbers for the 4 classes"):
        setup_lib.validate_config(_config(class_weights="1,2,3", class_names=tuple(names)))
    with pytest.raises(ConfigError, match="need 4 positive numbers"):
        losses.resolve_class_weights("1,2,3", names, counts)


def test_tokenizer_vocab_size_is_checked_only_when_one_is_trained():
    setup_lib.validate_config(_config(tokenizer="weights/distilbert", tokenizer_vocab_size=0))
    with pytest.raises(ConfigError, match="tokenizer_vocab_size"):
        setup_lib.validate_config(_config(tokenizer="", tokenizer_vocab_size=5))


@pytest.mark.parametrize("key", ["eval_batch_size", "log_every_steps", "keep_checkpoints"])
def test_bad_value_fails_before_any_data_is_prepared(tmp_path, key):
    from configs import demo
    from jaxmm.training import loop

    c = demo.get_config()
    c.data_dir = str(tmp_path / "data")
    c[key] = 0
    with pytest.raises(ConfigError, match=f"config.{key}=0"):
        loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "data")


def test_batchnorm_sync_is_checked_against_the_device_count():
    setup_lib.validate_config(_config(batchnorm_sync="group:2"))  # 4 fake devices
    setup_lib.validate_config(_config(batchnorm_sync="device"))
    for bad in ("group:3", "node"):
        with pytest.raises(ConfigError, match="^config.batchnorm_sync=") as err:
            setup_lib.validate_config(_config(batchnorm_sync=bad))
        assert "\n" not in str(err.value)


def test_rng_scheme_is_checked():
    setup_lib.validate_config(_config(rng_scheme="per_device"))
    with pytest.raises(ConfigError, match="^config.rng_scheme='per_host': choose one of "
                                          "per_example, per_device$"):
        setup_lib.validate_config(_config(rng_scheme="per_host"))
