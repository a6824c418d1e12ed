"""The ``Storage`` contract, run against every implementation: POSIX (a real directory) and
fsspec (S3 through s3fs, against two S3 servers over HTTP on 127.0.0.1: moto, and s3rver,
which ignores ``If-None-Match``).

A new backend joins by adding a case to the ``storage`` fixture; every test here must pass.
"""

import io

import pytest

from distckpt.layout.guarantees import honours_exclusive_create
from distckpt.storage import Storage, open_storage
from tests.support.s3 import S3_SERVERS, s3_bucket


@pytest.fixture(params=["posix", *S3_SERVERS])
def storage(request, tmp_path):
    if request.param == "posix":
        return open_storage(str(tmp_path / "root"))
    return open_storage(*s3_bucket(request, request.param))


def _at(storage, *parts):
    return storage.join(storage.root, *parts)


def test_it_is_a_storage_with_a_root(storage):
    assert isinstance(storage, Storage)
    assert storage.root and storage.url
    storage.makedirs(storage.root)
    storage.makedirs(storage.root)  # idempotent


def test_missing_paths_read_as_absent(storage):
    assert storage.listdir(_at(storage, "nothing")) == []
    assert not storage.exists(_at(storage, "nothing", "file"))
    with pytest.raises(FileNotFoundError):
        storage.size(_at(storage, "nothing", "file"))


def test_write_bytes_is_read_back_and_replaced_whole(storage):
    storage.makedirs(_at(storage, "d"))
    path = _at(storage, "d", "f.json")
    storage.write_bytes(path, b"first")
    assert storage.read_bytes(path) == b"first" and storage.size(path) == 5
    storage.write_bytes(path, b"second, longer")
    assert storage.read_bytes(path) == b"second, longer"
    assert storage.listdir(_at(storage, "d")) == ["f.json"]  # no temporary file left behind


def test_exclusive_create_has_one_winner_or_the_probe_says_it_has_not(storage):
    storage.makedirs(_at(storage, "d"))
    path = _at(storage, "d", "marker")
    storage.write_bytes(path, b"mine", exclusive=True)
    try:
        storage.write_bytes(path, b"theirs", exclusive=True)
        refused = False
    except FileExistsError:
        refused = True
    assert honours_exclusive_create(storage, storage.root) is refused  # found out, never assumed
    assert storage.read_bytes(path) == (b"mine" if refused else b"theirs")
    assert storage.listdir(_at(storage, "d")) == ["marker"]  # the probe cleans up after itself


def test_streams_write_durably_and_read_seekably(storage):
    storage.makedirs(_at(storage, "d"))
    path = _at(storage, "d", "blob")
    data = bytes(range(256)) * 4096
    with storage.open_write(path) as f:
        for i in range(0, len(data), 100_000):
            f.write(data[i : i + 100_000])
    assert storage.size(path) == len(data)
    with storage.open_read(path) as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        f.seek(0, io.SEEK_SET)
        assert f.read() == data


def test_listdir_is_sorted_names(storage):
    for name in ("b", "a", "c"):
        storage.makedirs(_at(storage, name))
        storage.write_bytes(_at(storage, name, "x"), b"1")
    assert storage.listdir(storage.root) == ["a", "b", "c"]


def test_remove_and_rmtree(storage):
    storage.makedirs(_at(storage, "t", "sub"))
    storage.write_bytes(_at(storage, "t", "sub", "x"), b"1")
    storage.write_bytes(_at(storage, "t", "y"), b"2")
    storage.remove(_at(storage, "t", "y"))
    assert not storage.exists(_at(storage, "t", "y"))
    storage.rmtree(_at(storage, "t"))
    assert not storage.exists(_at(storage, "t", "sub", "x"))
    assert storage.listdir(_at(storage, "t")) == []


def test_put_file_uploads_a_local_file(storage, tmp_path):
    src = tmp_path / "local.bin"
    src.write_bytes(b"x" * 12345)
    storage.makedirs(_at(storage, "up"))
    storage.put_file(str(src), _at(storage, "up", "remote.bin"))
    assert storage.read_bytes(_at(storage, "up", "remote.bin")) == b"x" * 12345


def test_rename_is_atomic_where_claimed_and_refused_elsewhere(storage):
    storage.makedirs(_at(storage, "src"))
    storage.write_bytes(_at(storage, "src", "f"), b"1")
    if not storage.atomic_rename:
        with pytest.raises(NotImplementedError):
            storage.rename(_at(storage, "src"), _at(storage, "dst"))
        return
    storage.rename(_at(storage, "src"), _at(storage, "dst"))
    assert storage.read_bytes(_at(storage, "dst", "f")) == b"1" and not storage.exists(_at(storage, "src"))
    storage.makedirs(_at(storage, "other"))
    storage.write_bytes(_at(storage, "other", "g"), b"2")
    with pytest.raises(OSError):  # never replaces a non-empty directory: a step commits once
        storage.rename(_at(storage, "other"), _at(storage, "dst"))
    assert storage.read_bytes(_at(storage, "dst", "f")) == b"1"
