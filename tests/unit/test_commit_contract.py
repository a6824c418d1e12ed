"""The ``Commit`` contract, for each strategy on the storage it is made for: ``RenameCommit``
on a POSIX directory, ``MarkerCommit`` on S3 (moto, and s3rver, which ignores If-None-Match). A step is listed once
``finish`` returns and never before; it commits once; ``abort`` and ``delete`` never leave
anything that looks committed. A new strategy joins by adding a case to ``commit``."""

import pytest

from distckpt.errors import CommitError
from distckpt.layout.catalog import Catalog
from distckpt.layout.commit import MarkerCommit, RenameCommit, commit_for
from distckpt.layout.manifest import FileRecord, Manifest, checksum_bytes
from distckpt.storage import open_storage
from tests.support.s3 import S3_SERVERS, s3_bucket


@pytest.fixture(params=["rename", *(f"marker-{s}" for s in S3_SERVERS)])
def commit(request, tmp_path):
    if request.param == "rename":
        storage = open_storage(str(tmp_path / "root"))
    else:  # on moto (If-None-Match honoured) and s3rver (ignored)
        storage = open_storage(*s3_bucket(request, request.param.split("-", 1)[1]))
    chosen = commit_for(storage)
    assert isinstance(chosen, RenameCommit if request.param == "rename" else MarkerCommit)
    chosen.open_root()
    return chosen


def _write_step(commit, step, nonce="n1", payload=b"tensor bytes"):
    """Write one data file into a work directory; return the directory and its manifest."""
    storage = commit.storage
    workdir = commit.workdir(step, nonce)
    commit.create_workdir(workdir)
    storage.write_bytes(storage.join(workdir, "data.distcp"), payload)
    rec = FileRecord("data.distcp", len(payload), checksum_bytes(payload), 0)
    return workdir, Manifest(step=step, world_size=1, mode="sharded", files={rec.name: rec})


def test_a_step_is_listed_only_after_finish(commit):
    catalog = Catalog(commit.storage, commit)
    workdir, manifest = _write_step(commit, 5)
    assert catalog.list() == [] and not catalog.is_committed(5)
    final = commit.finish(workdir, manifest)
    assert [c.step for c in catalog.list()] == [5]
    assert commit.storage.read_bytes(commit.storage.join(final, "data.distcp")) == b"tensor bytes"
    assert catalog.read_manifest(5).files == manifest.files


def test_a_step_commits_once(commit):
    workdir, manifest = _write_step(commit, 7, "first", b"first")
    commit.finish(workdir, manifest)
    again, second = _write_step(commit, 7, "second", b"other")
    with pytest.raises(CommitError, match="already committed"):
        commit.finish(again, second)
    catalog = Catalog(commit.storage, commit)
    assert catalog.read_manifest(7).files == manifest.files  # the first commit stands


def test_marker_commit_refuses_a_step_whose_files_are_incomplete(any_s3):
    # object stores only: there the manifest is the commit, so the chief checks every file
    # first (on POSIX, files are fsynced before the rename, which moves them all at once)
    commit = commit_for(open_storage(*any_s3))
    workdir, manifest = _write_step(commit, 3)
    commit.storage.remove(commit.storage.join(workdir, "data.distcp"))
    with pytest.raises(CommitError, match="missing"):
        commit.finish(workdir, manifest)
    assert not Catalog(commit.storage, commit).is_committed(3)


def test_abort_removes_uncommitted_work_only(commit):
    done, manifest = _write_step(commit, 1)
    commit.finish(done, manifest)
    failed, _ = _write_step(commit, 2, "n2")
    commit.abort(failed)
    catalog = Catalog(commit.storage, commit)
    assert [c.step for c in catalog.list()] == [1] and catalog.leftovers() == []
    commit.abort(commit.workdir(1, "n1"))  # on object stores the workdir is the step: it stays
    assert catalog.is_committed(1)


def test_interrupted_work_is_a_leftover_not_a_step(commit):
    _write_step(commit, 4)  # never finished: a crash mid-save
    catalog = Catalog(commit.storage, commit)
    assert catalog.list() == []
    assert len(catalog.leftovers()) == 1
    catalog.clean_leftovers()
    assert catalog.leftovers() == []


def test_delete_uncommits_then_removes(commit):
    workdir, manifest = _write_step(commit, 9)
    commit.finish(workdir, manifest)
    commit.delete(9)
    catalog = Catalog(commit.storage, commit)
    assert catalog.list() == [] and catalog.leftovers() == []
