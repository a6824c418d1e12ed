import json

import pytest

from distckpt import CorruptCheckpointError
from distckpt.layout.manifest import FileRecord, Manifest, step_dirname


def _manifest():
    return Manifest(
        step=12, world_size=2, mode="sharded", files={"a": FileRecord("a", 3, "0000abcd", 1)}, meta={"k": 1}
    )


def test_manifest_round_trips_as_plain_json():
    data = _manifest().to_json()
    doc = json.loads(data)
    assert doc["format"] == "distckpt" and doc["files"]["a"] == {"size": 3, "checksum": "0000abcd", "rank": 1}
    assert {"torch", "distckpt", "python"} <= doc["versions"].keys()
    back = Manifest.from_json(data, "m")
    assert back.files == _manifest().files and back.meta == {"k": 1} and back.nbytes == 3


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other"), "not a distckpt manifest"),
        (lambda d: d.update(format_version=99), "upgrade distckpt"),
        (lambda d: d.pop("files"), "files"),
        (lambda d: d["files"].update({"../x": {"size": 1, "checksum": "0"}}), "plain names"),
    ],
)
def test_bad_manifests_are_corrupt_with_the_reason(mutate, message):
    doc = json.loads(_manifest().to_json())
    mutate(doc)
    with pytest.raises(CorruptCheckpointError, match=message):
        Manifest.from_json(json.dumps(doc).encode(), "somewhere")


def test_garbage_bytes_are_corrupt():
    with pytest.raises(CorruptCheckpointError, match="somewhere"):
        Manifest.from_json(b"\x00\x01garbage", "somewhere")


def test_step_dirnames_sort_numerically():
    assert sorted([step_dirname(s) for s in (10, 9, 100)]) == [step_dirname(s) for s in (9, 10, 100)]
    with pytest.raises(ValueError):
        step_dirname(-1)
