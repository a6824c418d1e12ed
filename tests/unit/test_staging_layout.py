"""The staging pool lays a state out once and keeps its views from save to save
(``arena.Layout``, ``Arena.views``): saves of a state laid out alike reuse them, a state
that changed (a new tensor, a new shape or dtype, another order) is laid out again, and
every save's bytes are the state's at that save."""

import torch

from distckpt.staging import PoolStager


def _state(scale: float, extra: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"layer{i}.w": torch.randn(5 + i, 3, generator=g) * scale for i in range(50)}
    out["embed"] = torch.randn(1000, generator=g).to(torch.bfloat16) * scale
    out["step"] = torch.tensor(7)
    if extra:
        out["exp_avg.layer0"] = torch.randn(5, 3, generator=g)
    return out


def _stage(stager: PoolStager, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    staged = stager.stage(state)
    out = dict(staged.materialize())
    assert {k: torch.equal(out[k], v) for k, v in state.items()} == dict.fromkeys(state, True)
    assert not any(t.data_ptr() == state[k].data_ptr() for k, t in out.items() if t.numel())  # copies
    staged.release()
    return out


def test_a_state_laid_out_alike_reuses_its_views_and_gets_new_bytes():
    stager = PoolStager()
    try:
        first = _stage(stager, _state(1.0))
        second = _stage(stager, _state(2.0))  # same names, shapes, dtypes; other values
        assert all(second[k] is first[k] for k in first)  # the very same views, refilled
        assert torch.equal(second["layer3.w"], _state(2.0)["layer3.w"])
    finally:
        stager.close()


def test_a_changed_state_is_laid_out_again():
    stager = PoolStager()
    try:
        first = _stage(stager, _state(1.0))
        grown = _stage(stager, _state(3.0, extra=True))  # a new tensor (the optimizer's first step)
        assert grown["layer0.w"] is not first["layer0.w"]
        reshaped = dict(_state(1.0))
        reshaped["layer1.w"] = torch.randn(2, 2)  # same names, one new shape
        again = _stage(stager, reshaped)
        assert again["layer1.w"].shape == (2, 2)
        reordered = dict(reversed(list(_state(4.0).items())))  # same tensors, another order
        _stage(stager, reordered)
        retyped = dict(_state(1.0))
        retyped["embed"] = retyped["embed"].float()
        assert _stage(stager, retyped)["embed"].dtype == torch.float32
    finally:
        stager.close()


def test_parameters_are_staged_without_autograd_history():
    """The copy runs on several threads (grad mode is per thread): the staged copy of a
    parameter must not record a graph into the arena."""
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(40)])  # 42 MB: copied in parallel
    state = {k: v for k, v in model.named_parameters()}
    assert all(v.requires_grad for v in state.values())
    stager = PoolStager()
    try:
        for _ in range(2):
            staged = stager.stage(state)
            out = staged.materialize()
            assert not any(t.requires_grad or t.grad_fn is not None for t in out.values())
            assert all(torch.equal(out[k], v.detach()) for k, v in state.items())
            staged.release()
    finally:
        stager.close()
