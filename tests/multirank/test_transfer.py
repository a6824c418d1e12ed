"""``distckpt.transfer``, ``distckpt.open`` and the export API, in-process, against a checkpoint
written by a 2-rank FSDP2 job (and a small one on the S3 test server)."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distckpt
from distckpt.tools.export import export
from tests.support.cli_jobs import VAL_LOSS, WIDTH, shared_checkpoints
from tests.support.harness import run_ranks
from tests.support.models import make_model, tensors_equal


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A sharded FSDP2 checkpoint (steps 1-3) and its exports (``--only model``)."""
    shared = shared_checkpoints(tmp_path_factory)
    base = tmp_path_factory.mktemp("transfer")
    st = export(shared["url"], str(base / "model.safetensors"), only="model")
    pt = export(shared["url"], str(base / "model.pt"), only="model")
    return {"root": shared["url"], "full": shared["full"], "safetensors": st.path, "pt": pt.path}


def _wider_head(seed: int = 7) -> nn.Sequential:
    """Same trunk as the saved model; a 5-way head instead of 4, plus a new layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 5), nn.Linear(5, 2)
    )


def test_transfer_into_another_architecture_loads_matches_and_reports_the_rest(saved):
    model = _wider_head()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = distckpt.transfer(model, saved["root"])  # the newest step; only="model" by default
    ref = saved["full"][3]
    assert report.only == "model" and report.source.endswith("step_000000000003")
    assert report.loaded == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert report.mismatched == {"4.weight": ((4, WIDTH), (5, WIDTH)), "4.bias": ((4,), (5,))}
    assert report.missing == ["5.weight", "5.bias"] and report.unexpected == []
    sd = model.state_dict()
    for name in report.loaded:
        assert torch.equal(sd[name], ref[name])
    for name in ("4.weight", "4.bias", "5.weight", "5.bias"):
        assert torch.equal(sd[name], before[name])  # untouched
    assert "shape mismatch 4.weight: source [4, 20], module [5, 20]" in str(report)


def test_strict_transfer_raises_with_the_report_before_touching_the_module(saved):
    model = _wider_head()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(distckpt.IncompatibleCheckpointError, match="2 shape-mismatched") as info:
        distckpt.transfer(model, saved["root"], strict=True, step=2)
    assert info.value.report.mismatched.keys() == {"4.weight", "4.bias"}
    assert tensors_equal(model.state_dict(), before)
    exact = make_model(seed=3, width=WIDTH)
    report = distckpt.transfer(exact, saved["root"], strict=True, step=2)
    assert report.ok and tensors_equal(exact.state_dict(), saved["full"][2])


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_transfer_from_exported_files_is_bit_exact(saved, kind):
    model = make_model(seed=5, width=WIDTH)
    report = distckpt.transfer(model, saved[kind], strict=True)
    assert report.source == saved[kind] and report.only == "" and len(report.loaded) == 6
    assert tensors_equal(model.state_dict(), saved["full"][3])


def _into_ddp(rank, world, source):
    model = _wider_head(seed=11)
    ddp = DDP(model)
    report = distckpt.transfer(ddp, source)  # DDP's "module." is not part of the names
    return {k: v.clone() for k, v in model.state_dict().items()}, report.loaded


def test_transfer_into_a_ddp_wrapped_module_and_from_a_ddp_state_dict(saved, tmp_path):
    state, loaded = run_ranks(_into_ddp, 1, saved["safetensors"])[0]
    assert loaded == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(torch.equal(state[k], saved["full"][3][k]) for k in loaded)
    # a state dict saved from a DDP module carries "module." on every name
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in saved["full"][3].items()}, path)
    plain = make_model(seed=2, width=WIDTH)
    assert distckpt.transfer(plain, str(path), strict=True).ok
    assert tensors_equal(plain.state_dict(), saved["full"][3])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = make_model(seed=4, width=WIDTH)
        self.head = nn.Linear(4, 2)


def test_rename_by_prefix_dict_and_by_callable(saved):
    net = _Net()
    report = distckpt.transfer(net, saved["root"], rename={"": "backbone"})
    assert len(report.loaded) == 6 and report.missing == ["head.weight", "head.bias"]
    assert tensors_equal(net.backbone.state_dict(), saved["full"][3])

    net = _Net()
    report = distckpt.transfer(
        net, saved["pt"], rename=lambda n: None if n.startswith("4.") else f"backbone.{n}", strict=False
    )
    assert report.loaded == ["backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias"]
    assert "backbone.4.weight" in report.missing and report.unexpected == []

    # a checkpoint dict laid out as {"model": ..., "optim": ...}: only= picks the section
    other = _Net()
    source = {"model": {f"backbone.{k}": v for k, v in saved["full"][1].items()}, "epoch": 3}
    report = distckpt.transfer(other, source, only="model")
    assert len(report.loaded) == 6 and tensors_equal(other.backbone.state_dict(), saved["full"][1])


def test_transfer_from_an_s3_step_url(s3_root, s3_options):
    model = make_model(seed=0, width=WIDTH)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with distckpt.Checkpointer(s3_root, {"model": model}, storage_options=s3_options) as ckpt:
        ckpt.save(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ckpt.save(2)
    target = make_model(seed=1, width=WIDTH)
    report = distckpt.transfer(target, f"{s3_root}/step_000000000001", storage_options=s3_options, strict=True)
    assert report.source.endswith("step_000000000001") and len(report.loaded) == 6
    assert tensors_equal(target.state_dict(), expected)


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_transfer_never_unpickles_code_from_a_torch_file(tmp_path):
    evil = tmp_path / "model.pt"
    torch.save({"0.weight": _Boom(str(tmp_path / "PWNED"))}, evil)
    with pytest.raises(distckpt.DistckptError, match="weights_only=True refused it"):
        distckpt.transfer(make_model(), str(evil))
    assert not (tmp_path / "PWNED").exists()


def test_open_exposes_what_ls_and_inspect_show_without_a_process_group(saved, tmp_path):
    reader = distckpt.open(saved["root"])
    infos = reader.list()
    assert [i.step for i in infos] == [1, 2, 3] and [i.meta["val_loss"] for i in infos] == list(VAL_LOSS.values())
    assert reader.leftovers() == [] and reader.lease() is None
    contents = reader.inspect(2)
    assert contents.info.step == 2 and contents.recoverables["ids"] == 48
    by_name = {t.name: t for t in contents.tensors}
    assert by_name["model.2.weight"].shape == (WIDTH, WIDTH) and by_name["model.2.weight"].ranks == [0, 1]
    assert reader.verify(2).ok
    # a step URL opens its root, pinned to that step
    pinned = distckpt.open(f"{saved['root']}/step_000000000002")
    assert pinned.inspect().info.step == 2 and [i.step for i in pinned.list()] == [1, 2, 3]


def test_export_api_streams_in_small_batches_and_refuses_unknown_formats(saved, tmp_path):
    out = tmp_path / "all.safetensors"
    result = export(saved["root"], str(out), step=1, batch_bytes=64)  # many DCP reads, one tensor each
    loaded = safetensors.torch.load_file(str(out))
    assert result.tensors == len(loaded) and result.nbytes == sum(t.numel() * t.element_size() for t in loaded.values())
    assert tensors_equal({k[len("model.") :]: v for k, v in loaded.items() if k.startswith("model.")}, saved["full"][1])
    half = export(saved["root"], str(tmp_path / "half.safetensors"), step=2, only="model", dtype="fp16")
    loaded = safetensors.torch.load_file(half.path)
    for name, value in saved["full"][2].items():
        assert loaded[name].dtype == torch.float16
        torch.testing.assert_close(loaded[name].float(), value, rtol=2**-10, atol=1e-4)
    with pytest.raises(distckpt.DistckptError, match=r"\*.safetensors or \*.pt"):
        export(saved["root"], str(tmp_path / "m.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.safetensors", "half.safetensors"]
