"""The ``distckpt`` command, run as a subprocess against checkpoints written by 2-rank jobs,
on local disk and on the S3 test server (moto over HTTP)."""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid

import pytest
import safetensors.torch
import torch

import distckpt
from tests.support.cli_jobs import VAL_LOSS, WIDTH, Store, cli, fsdp_job, one_line_error, shared_checkpoints
from tests.support.faults import doctor
from tests.support.harness import run_ranks
from tests.support.models import make_model, tensors_equal

STEP = "step_000000000003"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """An FSDP2 job's sharded root (steps 1-3) and a DDP job's chief-mode root (step 5)."""
    return {**shared_checkpoints(tmp_path_factory), "store": Store(None)}


@pytest.fixture(scope="module")
def s3(s3_server):
    """The same FSDP2 job, saving to a bucket on the S3 test server."""
    import s3fs

    bucket = f"cli-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_server).mkdir(bucket)
    url = f"s3://{bucket}/run"
    full = run_ranks(fsdp_job, 2, url, dict(s3_server), timeout=240)[0]
    return {"url": url, "full": full, "store": Store(dict(s3_server)), "bucket": bucket}


@pytest.fixture(params=["local", "s3"])
def ckpt(request):
    return request.getfixturevalue(request.param)


def _clone(ckpt, tmp_path):
    store = ckpt["store"]
    dst = str(tmp_path / "copy") if store.options is None else f"s3://{ckpt['bucket']}/copy-{uuid.uuid4().hex[:8]}"
    return store.clone(ckpt["url"], dst)


def test_ls_json_lists_committed_steps_and_shows_leftovers_apart(ckpt, tmp_path, s3_server):
    store = ckpt["store"]
    url = _clone(ckpt, tmp_path)
    store.write(f"{url}/step_000000000004/__0_0.distcp", b"an upload that never committed")
    if store.options is None:
        store.write(f"{url}/.tmp-step_000000000004-abc123/__1_0.distcp", b"interrupted")
        env, opts = {}, []
    else:  # the standard AWS environment variables reach s3fs: no --storage-options needed
        env = {
            "AWS_ENDPOINT_URL": s3_server["endpoint_url"],
            "AWS_ACCESS_KEY_ID": s3_server["key"],
            "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
        }
        opts = []
    proc = cli("ls", url, "--json", *opts, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    steps = doc["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["meta"]["val_loss"] for s in steps] == [VAL_LOSS[1], VAL_LOSS[2], VAL_LOSS[3]]
    assert {s["world_size"] for s in steps} == {2} and {s["mode"] for s in steps} == {"sharded"}
    man = json.loads(store.read(f"{url}/{STEP}/manifest.json"))
    assert steps[-1]["nbytes"] == sum(f["size"] for f in man["files"].values()) and steps[-1]["time"] > 0
    kinds = {x["name"]: x["kind"] for x in doc["leftovers"]}
    expected = {"step_000000000004": "step without manifest"}
    if store.options is None:
        expected[".tmp-step_000000000004-abc123"] = "interrupted save"
    assert kinds == expected

    if store.options is not None:
        return  # the table is the same code on every backend: checked once, on local disk
    table = cli("ls", url)
    assert table.returncode == 0, table.stderr
    committed, _, rest = table.stdout.partition("uncommitted leftovers")
    assert "val_loss=0.3" in committed and "sharded" in committed and "step_000000000004" not in committed
    assert "step_000000000004" in rest and "step without manifest" in rest


def test_inspect_reports_tensors_sharding_and_objects_from_metadata_alone(ckpt, tmp_path):
    store = ckpt["store"]
    url = _clone(ckpt, tmp_path)
    man = json.loads(store.read(f"{url}/{STEP}/manifest.json"))
    for name in man["files"]:  # no tensor data at all: inspect must not need it
        if name.endswith(".distcp"):
            store.remove(f"{url}/{STEP}/{name}")
    proc = cli("inspect", url, "--json", *store.opts())
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["step"] == 3 and doc["world_size"] == 2 and doc["meta"] == {"val_loss": VAL_LOSS[3]}
    tensors = {t["name"]: t for t in doc["tensors"]}
    full = ckpt["full"][3]
    for name, value in full.items():
        t = tensors[f"model.{name}"]
        assert t["shape"] == list(value.shape) and t["dtype"] == "float32" and t["recoverable"] == "model"
    w = tensors["model.0.weight"]  # [20, 8], FSDP2 shards dim 0 across the two ranks
    chunks = sorted((c["offsets"], c["sizes"], c["rank"]) for c in w["chunks"])
    assert chunks == [([0, 0], [10, 8], 0), ([10, 0], [10, 8], 1)] and w["ranks"] == [0, 1]
    assert all(man["files"][c["file"]]["rank"] == c["rank"] for c in w["chunks"])
    assert tensors["ids"]["dtype"] == "int64" and len(tensors["ids"]["chunks"]) == 1
    assert "optim.state.0.weight.exp_avg" in tensors
    model_bytes = sum(v.numel() * v.element_size() for v in full.values())
    assert doc["recoverables"]["model"] == model_bytes and doc["recoverables"]["ids"] == 6 * 8
    objects = {o["name"]: o["value"] for o in doc["objects"]}
    assert objects["cfg.name"] == "tiny" and objects["optim.param_groups.0.lr"] == 0.01

    if store.options is not None:
        return  # the table: checked once, on local disk
    table = cli("inspect", url, "--step", "3")
    assert table.returncode == 0, table.stderr
    assert "r0[0:10,:] r1[10:20,:]" in table.stdout and "cfg.name" in table.stdout


def test_inspect_never_unpickles_a_doctored_metadata_file(local, tmp_path):
    url = _clone(local, tmp_path)
    stepdir = os.path.join(url, STEP)
    doctor(stepdir, ".metadata", pickle.dumps(_Boom(str(tmp_path / "PWNED"))))
    # DCP's metadata comes from its JSON copy in state.json: the pickle is never opened
    proc = cli("inspect", url, "--json")
    assert proc.returncode == 0, proc.stderr
    w = {t["name"]: t for t in json.loads(proc.stdout)["tensors"]}["model.0.weight"]
    assert sorted(c["rank"] for c in w["chunks"]) == [0, 1]
    # a step without the copy (written before it existed): the restricted unpickler refuses
    state = json.load(open(os.path.join(stepdir, "state.json")))
    del state["dcp_metadata"]
    doctor(stepdir, "state.json", json.dumps(state).encode())
    line = one_line_error(cli("inspect", url))
    assert "refusing to load" in line or "not allowed" in line
    assert not (tmp_path / "PWNED").exists()


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_verify_passes_an_intact_root_and_names_a_flipped_byte(ckpt, tmp_path):
    store = ckpt["store"]
    good = cli("verify", ckpt["url"], "--all", *store.opts())
    assert good.returncode == 0, good.stdout + good.stderr
    assert [ln.split(":")[0] for ln in good.stdout.splitlines() if ln.startswith("step")] == [
        "step 1",
        "step 2",
        "step 3",
    ]
    assert good.stdout.count(": OK") == 3

    url = _clone(ckpt, tmp_path)
    victim = f"{url}/step_000000000002/__1_0.distcp"
    store.flip_byte(victim, at=len(store.read(victim)) // 2)
    bad = cli("verify", url, "--all", *store.opts())
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "step 2: DAMAGED" in bad.stdout and "step 1: OK" in bad.stdout and "step 3: OK" in bad.stdout
    assert "__1_0.distcp: checksum mismatch" in bad.stdout
    assert "step 2 __1_0.distcp" in bad.stderr
    assert distckpt.open(url, store.options).verify().ok  # the newest step (the default) is intact


def test_verify_json_reports_truncated_missing_files_and_a_damaged_manifest(local, tmp_path):
    url = _clone(local, tmp_path)
    stepdir = os.path.join(url, STEP)
    with open(os.path.join(stepdir, "__0_0.distcp"), "r+b") as f:
        f.truncate(10)
    os.remove(os.path.join(stepdir, "__1_1.distcp"))
    open(os.path.join(url, "step_000000000001", "manifest.json"), "w").write("{not json")
    proc = cli("verify", url, "--all", "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    reports = {r["step"]: r for r in doc["steps"]}
    assert not doc["ok"] and reports[2]["ok"] and reports[2]["files"] > 0
    assert [p["name"] for p in reports[1]["problems"]] == ["manifest.json"]
    problems = {p["name"]: p["problem"] for p in reports[3]["problems"]}
    assert problems.keys() == {"__0_0.distcp", "__1_1.distcp"}
    assert "10 bytes" in problems["__0_0.distcp"] and problems["__1_1.distcp"] == "missing"


def test_gc_dry_run_deletes_nothing_then_gc_applies_retention_and_removes_leftovers(ckpt, tmp_path):
    store = ckpt["store"]
    url = _clone(ckpt, tmp_path)
    leftover = f"{url}/step_000000000007/__0_0.distcp"
    store.write(leftover, b"partial")
    before = sorted(_listing(store, url))
    args = ("gc", url, "--keep-last", "1", "--keep-best", "1", "--metric", "val_loss", *store.opts())
    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete step 1" in dry.stdout and "would delete leftover step_000000000007" in dry.stdout
    assert "would delete step 2" not in dry.stdout and "would delete step 3" not in dry.stdout
    assert "keeping steps: 2, 3" in dry.stdout
    assert sorted(_listing(store, url)) == before  # nothing deleted

    real = cli(*args)
    assert real.returncode == 0, real.stderr
    reader = distckpt.open(url, store.options)
    assert [c.step for c in reader.list()] == [2, 3] and reader.leftovers() == []
    assert not store.exists(f"{url}/step_000000000001/manifest.json") and not store.exists(leftover)
    assert all(reader.verify(s).ok for s in (2, 3))


def _listing(store, url):
    if store.options is None:
        return [os.path.relpath(os.path.join(d, f), url) for d, _, fs in os.walk(url) for f in fs]
    store.fs.invalidate_cache()
    return store.fs.find(url)


def test_gc_spares_leftovers_while_a_live_job_holds_the_root(local, tmp_path):
    url = _clone(local, tmp_path)
    tmp = os.path.join(url, ".tmp-step_000000000004-feedbeef")
    os.makedirs(tmp)
    lock = {"job": "slurm::4242", "host": "node-17", "pid": 1, "nonce": "x", "refreshed": time.time()}
    open(os.path.join(url, ".distckpt-lock"), "w").write(json.dumps(lock))
    spared = cli("gc", url, "--keep-last", "3")
    assert spared.returncode == 0, spared.stderr
    assert "leaving .tmp-step_000000000004-feedbeef" in spared.stdout and "slurm::4242" in spared.stdout
    assert os.path.isdir(tmp)
    forced = cli("gc", url, "--keep-last", "3", "--force")
    assert forced.returncode == 0 and not os.path.exists(tmp)
    assert [c.step for c in distckpt.open(url).list()] == [1, 2, 3]


def test_ls_shows_which_rule_keeps_each_step_and_gc_applies_the_same_policy(local, tmp_path):
    url = _clone(local, tmp_path)
    rules = ("--keep-best", "1", "--metric", "val_loss", "--keep-newer-than", "0.001s")
    shown = cli("ls", url, *rules, "--json")
    assert shown.returncode == 0, shown.stderr
    kept_by = {s["step"]: s["kept_by"] for s in json.loads(shown.stdout)["steps"]}
    assert kept_by == {1: [], 2: ["best"], 3: ["newest"]}  # saved long ago: "recent" keeps none of them
    table = cli("ls", url, *rules)
    assert table.returncode == 0 and "kept by" in table.stdout and "delete" in table.stdout
    among = cli("ls", url, "--keep-last", "1", "--among", "val_loss=0.5", "--json")
    assert [s["kept_by"] for s in json.loads(among.stdout)["steps"]] == [
        ["last"],
        ["not selected"],
        ["not selected", "newest"],
    ]
    done = cli("gc", url, *rules)
    assert done.returncode == 0, done.stderr
    assert [c.step for c in distckpt.open(url).list()] == [2, 3]
    bad = cli("gc", url, "--keep-newer-than", "soon")
    assert bad.returncode == 2 and one_line_error(bad) and "duration" in bad.stderr


@pytest.mark.parametrize("which", ["local", "chief", "s3"])
def test_export_only_model_to_safetensors_is_bit_exact_and_loads_into_the_model(which, request, tmp_path):
    ckpt = request.getfixturevalue("s3" if which == "s3" else "local")
    url = ckpt["chief"] if which == "chief" else ckpt["url"]
    ref = ckpt["chief_state"] if which == "chief" else ckpt["full"][3]
    out = tmp_path / "model.safetensors"
    extra = ["--batch-mb", "0.001"] if which == "local" else []  # one tensor per batch: many DCP reads
    proc = cli("export", url, "--to", str(out), "--only", "model", *extra, *ckpt["store"].opts())
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    loaded = safetensors.torch.load_file(str(out))
    assert tensors_equal(loaded, {k: v.cpu() for k, v in ref.items()})
    model = make_model(seed=9, width=WIDTH)
    model.load_state_dict(loaded)  # strict: names carry no "model." prefix
    assert tensors_equal(model.state_dict(), loaded)


def test_export_to_pt_casts_floating_point_tensors_only(local, tmp_path):
    out = tmp_path / "all.pt"
    proc = cli("export", local["url"], "--step", "2", "--to", str(out), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    loaded = torch.load(out, weights_only=True)
    torch_dtype = torch.bfloat16
    assert loaded["ids"].dtype == torch.int64 and torch.equal(loaded["ids"], torch.arange(6))
    assert "optim.state.0.weight.exp_avg" in loaded  # no --only: every tensor, full names
    for name, value in local["full"][2].items():
        got = loaded[f"model.{name}"]
        assert got.dtype == torch_dtype
        torch.testing.assert_close(got.float(), value.float(), rtol=2**-7, atol=1e-5)


def test_export_refuses_an_unknown_prefix_and_leaves_no_file(local, tmp_path):
    line = one_line_error(cli("export", local["url"], "--to", str(tmp_path / "m.pt"), "--only", "nope"))
    assert "--only nope matches no tensor" in line and "model" in line
    assert not list(tmp_path.iterdir())  # no partial output left behind


@pytest.mark.parametrize(
    "args,expect",
    [
        (["ls", "{missing}"], "does not exist"),
        (["export", "{url}", "--step", "99", "--to", "{tmp}/m.safetensors"], "step 99 is not a committed checkpoint"),
        (["ls", "{garbage}"], "no distckpt checkpoints"),
        (["verify", "{garbage}"], "no committed checkpoint"),
        (["inspect", "{url}/step_000000000002/state.json"], "is a file, not a checkpoint directory"),
        (["gc", "{garbage}", "--keep-last", "1"], "no distckpt checkpoints"),
    ],
)
def test_every_command_fails_with_one_line_on_a_wrong_url_step_or_directory(local, tmp_path, args, expect):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "notes.txt").write_text("not a checkpoint")
    (garbage / "blob.bin").write_bytes(os.urandom(64))
    subst = {"missing": str(tmp_path / "nope"), "url": local["url"], "garbage": str(garbage), "tmp": str(tmp_path)}
    line = one_line_error(cli(*[a.format(**subst) for a in args]))
    assert expect in line


def test_missing_s3_credentials_is_one_line_error(s3):
    env = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_ENDPOINT_URL": None,
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    endpoint = json.dumps({"endpoint_url": s3["store"].options["endpoint_url"]})
    line = one_line_error(cli("ls", s3["url"], "--storage-options", endpoint, env=env))
    assert "no credentials" in line and "AWS_ACCESS_KEY_ID" in line
