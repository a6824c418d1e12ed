"""SpeechBrain's checkpointing tutorial, ported to distckpt section by section: "The
Checkpointer in a nutshell" and "What does a checkpoint look like?" (recoverables, the Duck
with class-level hooks, meta, ``importance_key`` with a predicate, keeping a limited number
of checkpoints with a predicate, finding the best one). SpeechBrain name -> distckpt name:
``recover_if_possible`` -> ``restore``, ``save_checkpoint`` -> ``save``,
``save_and_keep_only`` -> ``save`` + ``delete``, ``delete_checkpoints(num_to_keep=N,
ckpt_predicate=p)`` -> ``delete(keep=KeepLast(N), predicate=p)``, ``find_checkpoint`` ->
``find``; the decorators keep their names."""

import torch

import distckpt
from distckpt import KeepLast, mark_as_loader, mark_as_saver, register_checkpoint_hooks


class EpochCounter:
    """SpeechBrain's ``EpochCounter``: iterating yields the next epochs up to ``limit``."""

    def __init__(self, limit):
        self.current, self.limit = 0, limit

    def __iter__(self):
        while self.current < self.limit:
            self.current += 1
            yield self.current

    def state_dict(self):
        return {"current": self.current}

    def load_state_dict(self, state):
        self.current = state["current"]


def _nutshell_run(root, events):
    """One run of the tutorial's cell: recover, train one epoch, save, "crash"."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    epoch_counter = EpochCounter(10)
    with distckpt.Checkpointer(root, {"mdl": model, "opt": optimizer, "epochs": epoch_counter}) as checkpointer:
        checkpointer.restore()  # recover_if_possible(): the most recent, if any
        for epoch in epoch_counter:
            optimizer.zero_grad()
            prediction = model(torch.tensor([1.0]))
            loss = (prediction - torch.tensor([1.0])) ** 2
            loss.backward()
            optimizer.step()
            checkpointer.save(epoch, meta={"loss": loss.item()}, end_of_epoch=True)  # save_and_keep_only
            checkpointer.delete(keep=KeepLast(1))
            events.append(("epoch", epoch))
            break  # the "crash"
        else:
            info = checkpointer.restore(min_key="loss")
            events.append(("done", info.step))
    return model.weight.detach().clone()


def test_the_checkpointer_in_a_nutshell(tmp_path):
    root, events = str(tmp_path / "nutshell_checkpoints"), []
    for _ in range(11):  # "run the block multiple times"
        weight = _nutshell_run(root, events)
    assert events == [("epoch", e) for e in range(1, 11)] + [("done", 10)]
    assert [c.step for c in distckpt.open(root).list()] == [10]  # save_and_keep_only kept one
    torch.manual_seed(0)  # the same ten epochs without any crash
    model = torch.nn.Linear(1, 1, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    for _ in range(10):
        optimizer.zero_grad()
        ((model(torch.tensor([1.0])) - torch.tensor([1.0])) ** 2).backward()
        optimizer.step()
    assert torch.equal(weight, model.weight.detach())  # the recovered run is bit-identical


@register_checkpoint_hooks
class Duck:
    def __init__(self):
        self.quacks = 0
        self.loaded_end_of_epoch = None

    def quack(self):
        self.quacks += 1

    @mark_as_saver
    def save(self):
        return {"quacks": self.quacks}  # a state, not a file: distckpt keeps it as JSON

    @mark_as_loader
    def load(self, state, end_of_epoch):
        self.quacks = state["quacks"]
        self.loaded_end_of_epoch = end_of_epoch


def test_the_duck_saves_and_loads_through_its_own_class_hooks(tmp_path):
    for run in range(1, 4):
        duck = Duck()
        with distckpt.Checkpointer(str(tmp_path / "duckpoints"), {"ducky": duck}) as duckpointer:
            duckpointer.restore()
            duck.quack()
            duckpointer.save(run, end_of_epoch=run % 2 == 0)
        assert duck.quacks == run  # every run continued from the last one's count
    assert duck.loaded_end_of_epoch is True  # run 3 restored run 2's end-of-epoch checkpoint
    assert distckpt.open(str(tmp_path / "duckpoints")).state()["recoverables"]["ducky"] == {"quacks": 3}


def test_what_a_checkpoint_looks_like_meta_importance_and_predicates(tmp_path):
    model = torch.nn.Linear(1, 1, True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    checkpointer = distckpt.Checkpointer(str(tmp_path / "full_example_checkpoints"))
    checkpointer.add_recoverable("mdl", model)
    checkpointer.add_recoverables({"opt": optimizer, "epoch": EpochCounter(10)})
    step = iter(range(1, 100))
    first = checkpointer.save(next(step)).wait()  # save_checkpoint()
    saved = distckpt.open(first.url).state()["recoverables"]  # "each entity gets its own" entry
    assert set(saved) == {"mdl", "opt", "epoch"} and saved["epoch"] == {"current": 0}
    checkpointer.save(next(step), meta={"loss": 15.5, "validation-type": "fast", "num-examples": 3})
    ckpt = checkpointer.save(next(step), meta={"loss": 14.4, "validation-type": "full"}).wait()
    assert ckpt.meta == {"loss": 14.4, "validation-type": "full"}
    assert checkpointer.restore(min_key="loss").meta["loss"] == 14.4
    checkpointer.save(next(step), meta={"loss": 12.1, "validation-type": "fast", "num-examples": 2})
    ckpt = checkpointer.restore(
        importance_key=lambda c: -c.meta["loss"] / c.meta["num-examples"],
        predicate=lambda c: c.meta.get("validation-type") == "fast",
    )
    assert ckpt.meta["loss"] == 15.5  # -15.5/3 > -12.1/2
    # delete_checkpoints(num_to_keep=1, ckpt_predicate=lambda c: "validation-type" not in c.meta)
    checkpointer.save(next(step))  # a second checkpoint without meta
    assert checkpointer.delete(keep=KeepLast(1), predicate=lambda c: "validation-type" not in c.meta) == [1]
    # save_and_keep_only(meta=..., num_to_keep=2, ckpt_predicate=full)
    checkpointer.save(next(step), meta={"loss": 13.1, "validation-type": "full"})
    full = lambda c: c.meta.get("validation-type") == "full"  # noqa: E731
    checkpointer.save(next(step), meta={"loss": 13.5, "validation-type": "full"})
    assert checkpointer.delete(keep=KeepLast(2), predicate=full) == [3]
    assert [c.meta.get("loss") for c in checkpointer.list()] == [15.5, 12.1, None, 13.1, 13.5]
    best = checkpointer.find(min_key="loss", predicate=full)  # find_checkpoint(min_key=..., ckpt_predicate=...)
    assert best.meta["loss"] == 13.1
    checkpointer.close()
