"""The LightningModule of the study: SGD or SAM, mixup, and the warm-up/decay schedule stepped by hand."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lit_sharp.evaluation import ClassificationError
from lit_sharp.mixup import mix_batch, mixup_lambda
from lit_sharp.models.convert import is_old_layout, old_layout_error
from lit_sharp.sam import SAM, BatchNormStatsFreezer
from lit_sharp.schedule import warmup_linear_lr
from lit_sharp.top1 import batch_error


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the run stops instead of training on garbage."""


class ClassifierModule(pl.LightningModule):
    """An image classifier trained as in the paper (docs/protocol.md section 2).

    Per step: mixup drawn once (lambda from ``(seed, step)``); pass 1 forward/backward; for ``sam_rho > 0`` the SAM
    ascent ``w + rho g / ||g||`` (Foret et al. 2021) and pass 2 on the same mixed batch with BatchNorm running
    statistics frozen, so they move once per step as in plain training; then the SGD step. ``sam_rho = 0`` is plain SGD
    with no second pass. The learning rate of step ``t`` is :func:`~lit_sharp.schedule.warmup_linear_lr`.

    The step never waits for the host: nothing in it reads a device value back (the logged loss, error and learning
    rate stay device tensors, the learning rate of every step is looked up in a table built on the device when
    training starts), except the divergence check every ``check_finite_every`` steps; Lightning reads the logged
    values when it flushes its loggers (every ``trainer.log_every_n_steps`` steps). None of them is logged with
    ``prog_bar=True``, which would make Lightning read them after every batch; :mod:`lit_sharp.progress` shows them.

    Args:
        model: any ``nn.Module`` mapping normalized images to logits.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay on all parameters.
        nesterov: Nesterov momentum.
        warmup_fraction: share of all steps spent warming up linearly from 0 to ``lr``.
        sam_rho: SAM radius; 0 is plain SGD.
        sam_adaptive: ASAM (Kwon et al. 2021) instead of SAM.
        mixup_alpha: Beta(alpha, alpha) parameter of mixup; 0 turns mixup off.
        num_classes: number of classes.
        seed: seeds mixup's lambda per step.
        check_finite_every: read the loss back every this many steps to stop a diverged run. 1 stops at the first
            NaN/inf; on a GPU every read is a host synchronisation, so larger values keep the step asynchronous while
            a non-finite loss seen in between is still remembered and stops the run at the next read.
        channels_last: keep the model in ``channels_last`` memory format (faster convolutions on GPUs).
        compile: run the training passes through ``torch.compile`` (``True``: its default backend, inductor; a
            string names another backend, e.g. ``"aot_eager"``, which compiles in seconds). Only training is compiled:
            ``forward`` (what evaluation and the end-of-training measurements call, in eval mode and with other
            batch sizes) runs the plain model, so they neither recompile nor evict the training graph. Parameter
            names and checkpoints are those of the plain model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        warmup_fraction: float = 0.4,
        sam_rho: float = 0.0,
        sam_adaptive: bool = False,
        mixup_alpha: float = 0.0,
        num_classes: int = 10,
        seed: int = 0,
        check_finite_every: int = 1,
        channels_last: bool = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if check_finite_every < 1:
            raise ValueError(f"check_finite_every must be >= 1, got {check_finite_every}")
        # logger=False: the run logs its whole config once, as flat dotted keys (lit_sharp.tracking.log_config).
        self.save_hyperparameters(ignore=["model"], logger=False)
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        # A plain function attribute, not a module: it adds no state_dict keys. (nn.Module.compile compiles the
        # same function but installs it in place, which would also compile every evaluation call.)
        self._compiled_call = None
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self._compiled_call = torch.compile(self.model._call_impl, backend=backend)
        self._bn_freezer = BatchNormStatsFreezer(self.model)
        self.automatic_optimization = False
        self._nonfinite: torch.Tensor | None = None
        # Accumulated on the device and read once per validation epoch, when Lightning computes them.
        self.val_err = ClassificationError()
        self.val_loss = MeanMetric()
        self._lr_table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self._compiled_call is None else self._compiled_call(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        sgd_kwargs = dict(lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        if hp.sam_rho > 0:
            return SAM(self.parameters(), torch.optim.SGD, rho=hp.sam_rho, adaptive=hp.sam_adaptive, **sgd_kwargs)
        return torch.optim.SGD(self.parameters(), **sgd_kwargs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        optimizer = self.optimizers()
        self._set_lr(optimizer)
        lam = mixup_lambda(self.hparams.mixup_alpha, self.hparams.seed, self.global_step)
        inputs, targets = mix_batch(x, y, lam, self.hparams.num_classes) if lam < 1.0 else (x, y)

        logits = self._train_forward(inputs)
        loss = F.cross_entropy(logits, targets)
        self._stop_if_diverged(loss)
        self.manual_backward(loss)
        if self.hparams.sam_rho > 0:
            optimizer.step(closure=lambda: self._second_pass(optimizer, inputs, targets))
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Error against the clean labels, from pass 1 (the pass whose loss is logged).
        err = batch_error(logits.detach(), y)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True)
        self.log("train/err", err, on_step=True, on_epoch=True)
        self.log("train/lr", self._lr_on_device(), on_step=True, on_epoch=False)
        return loss.detach()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Test error and loss per epoch (``val/err``, ``val/loss``): the curves, not the final numbers."""
        x, y = batch
        logits = self.model(x)
        self.val_err.update(logits, y)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.log("val/err", self.val_err, on_step=False, on_epoch=True)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True)

    def _second_pass(self, optimizer: Any, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Gradient at ``w + e`` on the same mixed batch (SAM has zeroed the pass-1 gradient); BN moved in pass 1."""
        with self._bn_freezer.frozen():
            loss = F.cross_entropy(self._train_forward(inputs), targets)
            self.manual_backward(loss)
        return loss

    def on_train_start(self) -> None:
        # One host-to-device copy per fit instead of one per logged step (self.log of a float copies it, blocking).
        hp = self.hparams
        schedule = [warmup_linear_lr(t, self.total_steps, hp.lr, hp.warmup_fraction) for t in range(self.total_steps + 1)]
        self._lr_table = torch.tensor(schedule, device=self.device)

    def _lr_on_device(self) -> torch.Tensor:
        """This step's learning rate (what ``_set_lr`` gave the optimizer, in float32) as a device tensor."""
        return self._lr_table[min(self.global_step, len(self._lr_table) - 1)]

    def _set_lr(self, optimizer: Any) -> None:
        hp = self.hparams
        lr = warmup_linear_lr(self.global_step, self.total_steps, hp.lr, hp.warmup_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (``trainer.max_steps`` or epochs x batches per epoch)."""
        return max(int(self.trainer.estimated_stepping_batches), 1)

    def _stop_if_diverged(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite.to(bad.device) | bad
        # The last step is always read: a NaN in the final steps must not pass as a finished run.
        step = self.global_step + 1
        if (step % self.hparams.check_finite_every == 0 or step >= self.total_steps) and self._nonfinite.item():
            raise Diverged(f"training loss became non-finite ({loss.item()}) by step {self.global_step}")

    def check_finite(self) -> None:
        """Raise :class:`Diverged` if any loss seen so far (this process or before the resume) was NaN/inf."""
        if self._nonfinite is not None and bool(self._nonfinite.item()):
            raise Diverged(f"training loss became non-finite by step {self.global_step}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A non-finite loss seen since the last read must survive a resume, or the resumed run would forget it.
        checkpoint["nonfinite_loss_seen"] = self._nonfinite is not None and bool(self._nonfinite.item())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of the earlier ResNet key layout (one message saying how to convert it); restore the
        non-finite flag."""
        if is_old_layout(checkpoint.get("state_dict", {})):
            path = self._trainer.ckpt_path if self._trainer is not None else None  # None outside trainer.fit
            raise old_layout_error(path or "the checkpoint to load")
        if checkpoint.get("nonfinite_loss_seen"):
            self._nonfinite = torch.tensor(True)
