"""GossipOptimizer: a torch optimizer whose step() also gossips (dpwa_torch.optimizer)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import cluster

torch = pytest.importorskip("torch")

from dpwa_torch.optimizer import GossipOptimizer, _unwrap_optimizer  # noqa: E402

import dpwa_core  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from integration_pair import assert_gossiped, run_pair  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "optimizer_digits" / "train.py"


def _lonely(**options: Any) -> dict[str, Any]:
    """A two-node config whose peer never starts: steps run, pulls fail fast."""
    return cluster(2, timeout_ms=200, **options)


def _train_step(model: torch.nn.Module, opt: Any) -> torch.Tensor:
    opt.zero_grad()
    loss = model(torch.ones(3, 4)).pow(2).mean()
    loss.backward()
    return loss


def test_step_steps_the_optimizer_then_gossips() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    with GossipOptimizer(adam, model, _lonely(), "w1", samples_per_step=8) as opt:
        assert opt.gossip.optimizer is adam  # catch-up and checkpoints carry Adam's state
        assert opt.param_groups is adam.param_groups and opt.defaults is adam.defaults
        before = model.weight.detach().clone()
        loss = _train_step(model, opt)
        opt.step(loss=loss)
        assert not torch.equal(model.weight, before)  # Adam stepped
        assert opt.state is adam.state and len(adam.state) == 2
        assert opt.loss == pytest.approx(loss.item())
        stats = opt.gossip.node.stats()
        assert stats["steps"] == 1 and stats["samples"] == 8  # one gossip step of 8 samples
        opt.step(samples=3)  # no loss given: the last one is reported again
        assert opt.gossip.node.stats()["samples"] == 11 and opt.loss == pytest.approx(loss.item())


def test_loss_comes_from_the_closure() -> None:
    model = torch.nn.Linear(4, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    with GossipOptimizer(sgd, model, _lonely(), "w1") as opt:

        def closure() -> torch.Tensor:
            return _train_step(model, opt).detach() + 7.0

        returned = opt.step(closure)
        assert opt.loss == pytest.approx(float(returned)) and opt.loss > 7.0
        opt.step(closure, loss=0.25)  # an explicit loss wins
        assert opt.loss == 0.25


def test_zero_grad_state_dict_and_lr_schedulers_reach_the_wrapped_optimizer() -> None:
    model = torch.nn.Linear(4, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    with GossipOptimizer(adam, model, _lonely(), "w1") as opt:
        assert isinstance(opt, torch.optim.Optimizer)
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        _train_step(model, opt)
        assert model.weight.grad is not None
        opt.step()
        schedule.step()
        assert adam.param_groups[0]["lr"] == pytest.approx(0.05)
        opt.zero_grad()
        assert model.weight.grad is None
        saved = opt.state_dict()
        # the wrapped optimizer's own format: a plain Adam loads it
        plain = torch.optim.Adam(torch.nn.Linear(4, 2).parameters(), lr=1.0)
        plain.load_state_dict(saved)
        assert plain.param_groups[0]["lr"] == pytest.approx(0.05)
        opt.load_state_dict(plain.state_dict())
        assert "GossipOptimizer" in repr(opt)


def test_wraps_an_existing_gossip_and_leaves_it_open() -> None:
    model = torch.nn.Linear(4, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gossip = dpwa_core.connect(model, _lonely(), "w1")
    try:
        opt = GossipOptimizer(sgd, gossip=gossip)
        assert gossip.optimizer is sgd  # set, since the handle had none
        opt.step(loss=1.0)
        opt.close()
        assert gossip.node.stats()["steps"] == 1
        opt2 = GossipOptimizer(sgd, gossip=gossip)
        opt2.step(loss=1.0)  # still open: close() left a handle it did not make
        assert gossip.node.stats()["steps"] == 2
    finally:
        gossip.close()


def test_bad_arguments_are_refused() -> None:
    model = torch.nn.Linear(4, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        GossipOptimizer(object(), model, _lonely(), "w1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model and config"):
        GossipOptimizer(sgd, model)
    with pytest.raises(ValueError, match="samples_per_step"):
        GossipOptimizer(sgd, model, _lonely(), "w1", samples_per_step=0)


def test_unwraps_framework_optimizer_wrappers() -> None:
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)

    class Wrapper:  # as accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer
        def __init__(self, inner: Any) -> None:
            self.optimizer = inner

    assert _unwrap_optimizer(Wrapper(Wrapper(sgd))) is sgd
    assert _unwrap_optimizer(sgd) is sgd
    assert _unwrap_optimizer(None) is None


def test_example_two_nodes_gossip_through_the_optimizer(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    saved, outputs = run_pair(EXAMPLE, cluster(2), tmp_path, "--steps", "200")
    assert_gossiped(saved)
    for name, out in outputs.items():
        assert f"{name} step 200 " in out, out
