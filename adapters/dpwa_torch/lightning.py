"""``DpwaCallback``: gossip every optimizer step of a PyTorch Lightning ``Trainer.fit``.

Each process that runs ``Trainer.fit`` is one dpwa node: the callback connects the
LightningModule when the fit starts (with the Trainer's first optimizer, so that a catch-up
carries its state), calls ``gossip.step(loss, samples=...)`` after each optimizer step, and
closes the node when the fit ends or fails. Importing this module imports ``lightning``; install
it with ``pip install 'dpwa[lightning]'``.

Which loss: the ``loss`` that ``training_step`` returned (a tensor, or the ``"loss"`` entry of
the dict it returned) for the batch that ended with the optimizer step (Lightning hands callbacks
that loss divided by ``accumulate_grad_batches``; the callback multiplies it back); a step
without one (a ``training_step`` that returned None) reports the last loss again. Samples: the
batch size, the length of the batch's first tensor (a tensor, a tuple or list, or a dict of
them), summed over the batches of one step when gradients are accumulated; give
``samples_per_batch`` to count otherwise.

One node is one Trainer process on one device: the callback refuses a Trainer whose world size
is above 1 (DDP's ranks hold one model between them; run one Trainer per node instead).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from dpwa_core.config import Config
from dpwa_core.connect import Gossip, connect
from dpwa_core.errors import ConfigError
from dpwa_torch.optimizer import _as_loss, _batch_size, _unwrap_optimizer

__all__ = ["DpwaCallback"]


class DpwaCallback(pl.Callback):  # type: ignore[misc]
    """Gossip after every optimizer step of ``Trainer.fit``.

    Args:
        config: the cluster: a YAML path, a mapping or a :class:`~dpwa_core.config.Config`.
        name: this node's name; defaults as in :func:`dpwa_core.connect` (``DPWA_NODE``, or the
            launcher's rank).
        samples_per_batch: clock advance per batch; None (the default) counts the batch's
            samples.
        wait_for_peers: seconds to wait at fit start for every peer to be up (None: do not
            wait; a short job whose processes start apart may want a few seconds).
        initial_loss: the loss reported before any batch returned one.
        carry_optimizer: give the Trainer's first optimizer to connect, so that a catch-up
            takes the peer's optimizer state and ``gossip.save`` keeps it.
        **connect_options: passed to :func:`dpwa_core.connect` (``seed``, ``zero_copy``,
            ``blocking``).

    Example:
        >>> trainer = lightning.Trainer(max_epochs=5, devices=1,                 # doctest: +SKIP
        ...                             callbacks=[DpwaCallback("cluster.yaml")])
        >>> trainer.fit(model, train_loader)                                      # doctest: +SKIP
    """

    def __init__(
        self,
        config: Config | str | os.PathLike[str] | Mapping[str, Any],
        name: str | None = None,
        *,
        samples_per_batch: int | None = None,
        wait_for_peers: float | None = None,
        initial_loss: float = 1.0,
        carry_optimizer: bool = True,
        **connect_options: Any,
    ) -> None:
        super().__init__()
        if samples_per_batch is not None and (
            not isinstance(samples_per_batch, int) or samples_per_batch < 1
        ):
            raise ValueError(
                f"samples_per_batch must be a positive int or None, got {samples_per_batch!r}"
            )
        self.config = config
        self.name = name
        self.samples_per_batch = samples_per_batch
        self.wait_for_peers = wait_for_peers
        self.carry_optimizer = carry_optimizer
        self.connect_options = connect_options
        self.loss = float(initial_loss)
        """The loss reported at the last gossip step."""
        self.gossip: Gossip[Any] | None = None
        """The :class:`~dpwa_core.connect.Gossip` handle while a fit runs (None otherwise)."""
        self.stats: dict[str, Any] = {}
        """The node's :meth:`~dpwa_core.node.Node.stats` as the last fit closed it."""
        self._global_step = 0
        self._samples = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Connect the module (the optimizers exist by now)."""
        if trainer.world_size > 1:
            raise ConfigError(
                f"DpwaCallback: this Trainer spans {trainer.world_size} processes; a dpwa node is "
                "one Trainer process on one device (devices=1, num_nodes=1): start one process "
                "per node of the config instead"
            )
        optimizer = None
        if self.carry_optimizer and trainer.optimizers:
            optimizer = _unwrap_optimizer(trainer.optimizers[0])
        self.gossip = connect(
            pl_module,
            self.config,
            self.name,
            framework="torch",
            optimizer=optimizer,
            **self.connect_options,
        )
        if self.wait_for_peers is not None:
            self.gossip.node.wait_for_peers(timeout=self.wait_for_peers)
        self._global_step = trainer.global_step
        self._samples = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Gossip once when this batch ended with an optimizer step."""
        if self.gossip is None:
            return
        self._samples += self.samples_per_batch or _batch_size(batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            # Lightning divides the loss it hands callbacks by accumulate_grad_batches.
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self.loss = _as_loss(loss) * scale
        # global_step counts optimizer steps: unchanged while gradients accumulate.
        if trainer.global_step == self._global_step:
            return
        self._global_step = trainer.global_step
        samples, self._samples = max(self._samples, 1), 0
        self.gossip.step(self.loss, samples=samples)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the node."""
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the node when the fit fails or is interrupted."""
        self._close()

    def _close(self) -> None:
        if self.gossip is not None:
            self.stats = self.gossip.node.stats()
            self.gossip.close()
            self.gossip = None
