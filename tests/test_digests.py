"""Content digests: equal for equal arrays whatever the container, different for any change."""

import jax.numpy as jnp
import numpy as np

from jaxmm.trained import digests


def _tree():
    return {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                       "b": np.zeros(4, np.float32)},
            "opt_state": (np.int32(7), {"mu": np.ones(3, jnp.bfloat16)})}


def test_equal_content_gives_equal_digests_whatever_the_container():
    a = digests.tree_digest(_tree())
    as_dict = _tree()
    as_dict["opt_state"] = {"1": as_dict["opt_state"][1], "0": as_dict["opt_state"][0]}
    assert digests.tree_digest(as_dict) == a  # Orbax may hand tuples back as dicts.
    assert digests.mismatches(_tree(), a) == []
    assert set(a["entries"]) == {"params", "opt_state"} and a["algorithm"] == "sha256"


def test_any_change_of_a_value_dtype_or_shape_is_a_mismatch():
    recorded = digests.tree_digest(_tree())
    changed = _tree()
    changed["params"]["w"].reshape(-1).view(np.uint8)[17] ^= 1  # One flipped bit.
    assert digests.mismatches(changed, recorded) == ["params"]
    changed = _tree()
    changed["params"]["b"] = changed["params"]["b"].astype(np.float64)
    assert digests.mismatches(changed, recorded) == ["params"]
    changed = _tree()
    changed["params"]["w"] = changed["params"]["w"].reshape(4, 3)
    assert digests.mismatches(changed, recorded) == ["params"]


def test_a_partial_tree_is_compared_on_its_own_entries():
    recorded = digests.tree_digest(_tree())
    assert digests.mismatches({"params": _tree()["params"]}, recorded) == []
    assert digests.mismatches({"params": _tree()["params"]}, {"algorithm": "md5"}) == ["params"]
