import json

import numpy as np
import pytest
import torch

from distckpt.tree import join, split, tensor_refs


def test_split_join_round_trip_keeps_every_leaf_type():
    state = {
        "w": torch.arange(6.0).reshape(2, 3),
        "nested": {"lst": [1, 2.5, "x", None, True], "tup": (1, (2, 3)), "t": torch.ones(2, dtype=torch.bfloat16)},
        "intkeys": {0: {"step": torch.tensor(3.0)}, 1: "b"},
        "bytes": b"\x00\xffdata",
        "np": np.arange(4, dtype=np.int16),
        "npscalar": np.float32(1.5),
        "dtype": torch.float16,
        "nan": float("nan"),
    }
    skeleton, tensors = split(state, "r")
    assert set(tensors) == {"r.w", "r.nested.t", "r.intkeys.0.step", "r.np"}
    assert tensor_refs(skeleton) == list(tensors)
    restored = join(json.loads(json.dumps(skeleton)), tensors)
    assert torch.equal(restored["w"], state["w"])
    assert restored["nested"]["tup"] == (1, (2, 3))
    assert restored["intkeys"][0]["step"].item() == 3.0 and restored["intkeys"][1] == "b"
    assert restored["bytes"] == state["bytes"]
    assert isinstance(restored["np"], np.ndarray) and (restored["np"] == state["np"]).all()
    assert restored["npscalar"] == np.float32(1.5) and isinstance(restored["npscalar"], np.float32)
    assert restored["dtype"] is torch.float16
    assert restored["nan"] != restored["nan"]


def test_user_keys_that_look_like_tags_are_escaped():
    state = {"__tensor__": "not a tensor", "__tuple__": [1]}
    skeleton, tensors = split(state, "r")
    assert tensors == {}
    assert join(json.loads(json.dumps(skeleton)), {}) == state


def test_inline_tensors_round_trip_through_json():
    state = {"rng": torch.get_rng_state(), "empty": torch.empty(0, 3), "half": torch.randn(3, dtype=torch.float16)}
    skeleton, tensors = split(state, "r", inline=True)
    assert tensors == {}
    restored = join(json.loads(json.dumps(skeleton)), {})
    for k in state:
        assert torch.equal(restored[k], state[k]) and restored[k].dtype == state[k].dtype


def test_unsupported_value_names_its_path_and_the_fix():
    with pytest.raises(TypeError, match=r"at 'r.a.1'.*register_hooks"):
        split({"a": [1, object()]}, "r")


def test_clashing_tensor_names_are_refused():
    with pytest.raises(ValueError, match="same name"):
        split({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, "r")
