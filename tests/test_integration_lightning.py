"""The Lightning callback: it attaches with the module's optimizer (one count per real optimizer
step under accumulate_grad_batches and an fp16 grad scaler that skips steps), uses the module's
own training_step as calibration loss (its self.log silenced), logs through pl_module.log,
resumes exactly through trainer.fit(ckpt_path=...), and refuses DeepSpeed and FSDP1 strategies."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import vcas  # noqa: E402
from models import TinyTransformer, token_batch  # noqa: E402
from vcas.integrations.lightning import VCASCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyTransformer(dim=16, depth=3)
        self.logged_losses = 0

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def log(self, name, *args, **kwargs):
        self.logged_losses += name == "train_loss"
        super().log(name, *args, **kwargs)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loader(n: int = 64):
    tokens, labels = token_batch(n=n, t=6, seed=0)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=8,
                                       shuffle=True, generator=torch.Generator().manual_seed(0))


def _adam_steps(trainer) -> int:
    """How many updates the module's AdamW really applied (its own per-parameter step count)."""
    return int(next(iter(trainer.optimizers[0].state.values()))["step"])


def _fit(callback, precision="32-true", max_steps=4, accumulate=2):
    module = Module()
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=[callback],
                         accelerator="cpu", devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, _loader())
    return trainer, module


@pytest.mark.parametrize("precision,controller",
                         [("32-true", "paper"), ("bf16-mixed", "paper"), ("bf16-mixed", "adaptive")])
def test_lightning_callback_counts_optimizer_steps_and_logs(precision, controller):
    callback = VCASCallback(vcas.VCASConfig(update_every=2, seed=0, controller=controller))
    trainer, module = _fit(callback, precision=precision)
    stats = callback.controller.stats()
    assert trainer.global_step == 4 and stats["steps"] == _adam_steps(trainer) == 4
    # The paper's controller every 2 steps; the adaptive one from the first step, at most 2 apart.
    assert stats["updates"] == 2 if controller == "paper" else stats["updates"] >= 2
    assert module.logged_losses == 8  # one per training micro-batch, none from calibration
    for key in ("vcas/s", "vcas/mean_act_ratio", "vcas/var_act_over_sgd", "vcas/train_flops_reduction"):
        assert key in trainer.callback_metrics
    assert float(trainer.callback_metrics["vcas/s"]) == pytest.approx(stats["s"])
    assert all(torch.isfinite(torch.tensor([stats["var_sgd"], stats["var_act"]])))




class Overflowing(Module):
    """Injects an inf gradient after the last micro-batch of the given optimizer steps (1-based),
    before the grad scaler unscales: an fp16 overflow, which makes the scaler skip the step."""

    def __init__(self, overflowing: set[int]) -> None:
        super().__init__()
        self.overflowing = overflowing

    def on_after_backward(self) -> None:
        last_micro_batch = (self.trainer.fit_loop.epoch_loop.batch_progress.current.ready % 2) == 0
        if last_micro_batch and self.trainer.global_step + 1 in self.overflowing:
            self.net.head.weight.grad[0, 0] = float("inf")


def test_steps_an_fp16_grad_scaler_skips_are_not_counted():
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    callback = VCASCallback(vcas.VCASConfig(update_every=2, seed=0, controller="paper"))
    module = Overflowing({2, 3})
    trainer = pl.Trainer(max_steps=5, accumulate_grad_batches=2, callbacks=[callback], accelerator="cpu",
                         devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _loader())
    assert scaler.get_scale() == 2.0**8  # halved twice: the two overflowing steps were skipped
    assert trainer.global_step == 5  # Lightning counts the skipped steps too
    stats = callback.controller.stats()
    assert stats["steps"] == _adam_steps(trainer) == 3 and [e["step"] for e in callback.controller.history] == [2]


# ------------------------------------------------------------------ resuming
class MemoryLogger(pl.loggers.Logger):
    """Stands for a metrics logger: the vcas/... metrics it receives, by step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        values = {k: float(v) for k, v in metrics.items() if k.startswith("vcas/")}
        if values:
            self.rows.setdefault(step, {}).update(values)


def _ordered_loader():
    tokens, labels = token_batch(n=64, t=6, seed=0)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=8)


def _fit_with_checkpoints(callback, directory, ckpt_path=None):
    module, logger = Module(), MemoryLogger()
    # Every 4 steps: at the end of an epoch, the point a plain DataLoader resumes from exactly.
    saving = pl.callbacks.ModelCheckpoint(dirpath=directory, every_n_train_steps=4, save_top_k=-1)
    trainer = pl.Trainer(max_steps=8, accumulate_grad_batches=2, callbacks=[callback, saving],
                         accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _ordered_loader(), ckpt_path=ckpt_path)  # 8 batches: 4 steps an epoch
    return trainer, module, logger


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_a_resumed_fit_logs_and_trains_exactly_as_the_uninterrupted_one(tmp_path, controller):
    config = vcas.VCASConfig(update_every=2, seed=0, controller=controller)
    whole_callback = VCASCallback(config)
    _, whole_module, whole_log = _fit_with_checkpoints(whole_callback, tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "epoch=0-step=4.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]["VCASCallback"]
    assert saved["controller"]["steps"] == 4 and saved["calibration"]["position"] >= 1

    callback = VCASCallback(config)
    resumed, resumed_module, resumed_log = _fit_with_checkpoints(callback, tmp_path / "resumed", checkpoint)
    assert resumed.global_step == 8 and callback.controller.stats()["steps"] == 8
    assert sorted(resumed_log.rows) == [4, 5, 6, 7] and sorted(whole_log.rows) == list(range(8))
    assert {step: whole_log.rows[step] for step in resumed_log.rows} == resumed_log.rows
    assert callback.controller.history == whole_callback.controller.history
    assert all(torch.equal(a, b) for a, b in zip(whole_module.parameters(), resumed_module.parameters()))


# ------------------------------------------------------------------ which optimizer
class TwoOptimizers(pl.LightningModule):
    """Manual optimization: the body steps every batch, the head every other one."""

    def __init__(self, both_hold_blocks: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.both_hold_blocks = both_hold_blocks
        self.net = TinyTransformer(dim=16, depth=2)

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
        body.step()
        if batch_idx % 2 == 0:
            head.step()
        body.zero_grad()
        head.zero_grad()

    def configure_optimizers(self):
        head = list(self.net.blocks.parameters()) if self.both_hold_blocks else list(self.net.head.parameters())
        body = [p for name, p in self.net.named_parameters() if not name.startswith("head.")]
        return torch.optim.SGD(body, lr=0.05), torch.optim.SGD(head, lr=0.05)


def _loss(module, batch):
    return F.cross_entropy(module.net(batch[0]), batch[1])


@pytest.mark.parametrize("both_hold_blocks", [False, True])
def test_the_optimizer_that_trains_the_sampled_layers_is_the_one_counted(both_hold_blocks):
    callback = VCASCallback(vcas.VCASConfig(update_every=2, seed=0), loss_fn=_loss)
    module = TwoOptimizers(both_hold_blocks)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, callbacks=[callback], accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    if both_hold_blocks:
        with pytest.raises(vcas.ConfigError, match="2 optimizers hold their weights"):
            trainer.fit(module, _loader())
        assert callback.controller is None and not vcas.install.installation.is_attached(module)
        return
    trainer.fit(module, _loader())
    assert callback.controller.stats()["steps"] == 4  # the body's steps, not the head's 2


# ------------------------------------------------------------------ refused strategies
def _setup(callback, strategy, stage="fit"):
    # setup() reads only the strategy; Lightning builds FSDP and DeepSpeed Trainers on GPUs only.
    callback.setup(types.SimpleNamespace(strategy=strategy), Module(), stage)


def test_deepspeed_and_fsdp1_strategies_are_refused_and_fsdp2_accepted():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    callback = VCASCallback()
    with pytest.raises(vcas.AttachError, match=r"FSDPStrategy uses FSDP1.*ModelParallelStrategy"):
        _setup(callback, FSDPStrategy())
    # DeepSpeedStrategy() needs the deepspeed package; the instance is what the check looks at.
    with pytest.raises(vcas.AttachError, match="DeepSpeedStrategy uses DeepSpeed"):
        _setup(callback, DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    _setup(callback, ModelParallelStrategy())
    _setup(callback, FSDPStrategy(), stage="validate")  # the callback does nothing outside fit


def test_attach_options_the_callback_passes_itself_are_refused():
    with pytest.raises(TypeError, match=r"passes optimizer to vcas\.attach itself"):
        VCASCallback(optimizer=None)
