"""``DpwaTrainerCallback``: gossip every optimizer step of a Hugging Face ``Trainer``.

Each process that runs ``Trainer.train`` is one dpwa node: the callback connects the model at
``on_train_begin`` (with the Trainer's optimizer, so that a catch-up carries its state), calls
``gossip.step(loss, samples=...)`` at every ``on_step_end`` (once per optimizer step, after the
scheduler), and closes the node at ``on_train_end``. Importing this module imports
``transformers``; install it with ``pip install 'dpwa[transformers]'``.

Which loss: a ``TrainerCallback`` is not given the step's loss, so the callback reads it where
the model returns it: a forward hook keeps the ``loss`` of each training forward pass (the
model's output's ``loss``, as every ``*For...`` model returns when given labels) and the step
reports their mean over the step's micro-batches (gradient accumulation). A model or a
``compute_loss`` that returns no ``loss`` falls back to the latest logged ``loss`` (fresh every
``logging_steps``), else ``initial_loss``. Samples: the rows of the step's training forward
passes (the first tensor argument's length), else ``train_batch_size *
gradient_accumulation_steps``.

One node is one Trainer process on one device: the callback refuses arguments whose
``world_size`` is above 1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dpwa_core.config import Config
from dpwa_core.connect import Gossip, connect
from dpwa_core.errors import ConfigError
from dpwa_torch.optimizer import _as_loss, _batch_size, _unwrap_optimizer

__all__ = ["DpwaTrainerCallback"]


class DpwaTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Gossip after every optimizer step of ``Trainer.train``.

    Args:
        config: the cluster: a YAML path, a mapping or a :class:`~dpwa_core.config.Config`.
        name: this node's name; defaults as in :func:`dpwa_core.connect` (``DPWA_NODE``, or the
            launcher's rank).
        samples_per_step: clock advance per optimizer step; None (the default) counts the rows
            the step trained on.
        wait_for_peers: seconds to wait at train begin for every peer to be up (None: do not
            wait).
        initial_loss: the loss reported before any was seen.
        carry_optimizer: give the Trainer's optimizer to connect, so that a catch-up takes the
            peer's optimizer state and ``gossip.save`` keeps it.
        **connect_options: passed to :func:`dpwa_core.connect` (``seed``, ``zero_copy``,
            ``blocking``).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,         # doctest: +SKIP
        ...                   callbacks=[DpwaTrainerCallback("cluster.yaml")])
        >>> trainer.train()                                                      # doctest: +SKIP
    """

    def __init__(
        self,
        config: Config | str | os.PathLike[str] | Mapping[str, Any],
        name: str | None = None,
        *,
        samples_per_step: int | None = None,
        wait_for_peers: float | None = None,
        initial_loss: float = 1.0,
        carry_optimizer: bool = True,
        **connect_options: Any,
    ) -> None:
        if samples_per_step is not None and (
            not isinstance(samples_per_step, int) or samples_per_step < 1
        ):
            raise ValueError(
                f"samples_per_step must be a positive int or None, got {samples_per_step!r}"
            )
        self.config = config
        self.name = name
        self.samples_per_step = samples_per_step
        self.wait_for_peers = wait_for_peers
        self.carry_optimizer = carry_optimizer
        self.connect_options = connect_options
        self.loss = float(initial_loss)
        """The loss reported at the last gossip step."""
        self.gossip: Gossip[Any] | None = None
        """The :class:`~dpwa_core.connect.Gossip` handle while training runs (None otherwise)."""
        self.stats: dict[str, Any] = {}
        """The node's :meth:`~dpwa_core.node.Node.stats` as the last training closed it."""
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []  # this step's micro-batch losses
        self._rows = 0  # and the rows they trained on
        self._logged: float | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Connect the model (the Trainer made its optimizer already)."""
        if args.world_size > 1:
            raise ConfigError(
                f"DpwaTrainerCallback: these TrainingArguments span {args.world_size} "
                "processes; a dpwa node is one Trainer process on one device: start one "
                "process per node of the config instead"
            )
        if model is None:
            raise ConfigError("DpwaTrainerCallback: the Trainer passed no model to on_train_begin")
        self._close()  # a second train() call starts a fresh node
        carried = _unwrap_optimizer(optimizer) if self.carry_optimizer else None
        self.gossip = connect(
            model,
            self.config,
            self.name,
            framework="torch",
            optimizer=carried,
            **self.connect_options,
        )
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)
        self._losses, self._rows, self._logged = [], 0, None
        if self.wait_for_peers is not None:
            self.gossip.node.wait_for_peers(timeout=self.wait_for_peers)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Gossip once: the optimizer stepped."""
        if self.gossip is None:
            return
        if self._losses:
            self.loss = _as_loss(torch.stack([loss.float().mean() for loss in self._losses]))
        elif self._logged is not None:
            self.loss = self._logged
        samples = self.samples_per_step or self._rows
        if not samples:
            samples = args.train_batch_size * args.gradient_accumulation_steps
        self._losses, self._rows = [], 0
        self.gossip.step(self.loss, samples=samples)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Keep the latest logged training loss, for models that return none."""
        if logs and "loss" in logs:
            with contextlib.suppress(TypeError, ValueError):  # a non-number stays unread
                self._logged = float(logs["loss"])

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Close the node."""
        self._close()

    def _record(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Forward hook: keep a training pass's loss and rows (evaluation passes are not)."""
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
        self._rows += _batch_size(list(args) + list(kwargs.values()))

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.gossip is not None:
            self.stats = self.gossip.node.stats()
            self.gossip.close()
            self.gossip = None
