"""The Lightning callback: the module's own training_step as calibration loss (its self.log
silenced), one count per optimizer step under accumulate_grad_batches, metrics through
pl_module.log, checkpointed controller state, and bf16-mixed precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import vcas  # noqa: E402
from models import TinyTransformer, token_batch  # noqa: E402
from vcas.integrations.lightning import VCASCallback  # noqa: E402


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
    assert trainer.global_step == 4 and stats["steps"] == 4
    # The paper's controller every 2 steps; the adaptive one from the first step, at most 2 apart.
    assert stats["updates"] == 2 if controller == "paper" else stats["updates"] >= 2
    assert module.logged_losses == 8  # one per training micro-batch, none from calibration
    for key in ("vcas/s", "vcas/mean_act_ratio", "vcas/var_act_over_sgd", "vcas/train_flops_reduction"):
        assert key in trainer.callback_metrics
    assert float(trainer.callback_metrics["vcas/s"]) == pytest.approx(stats["s"])
    assert all(torch.isfinite(torch.tensor([stats["var_sgd"], stats["var_act"]])))


def test_lightning_callback_state_is_checkpointed():
    callback = VCASCallback(vcas.VCASConfig(update_every=2, seed=0))
    _fit(callback)
    saved = callback.state_dict()
    resumed = VCASCallback(vcas.VCASConfig(update_every=2, seed=0))
    resumed.load_state_dict(saved)  # Lightning restores callbacks before fitting starts
    resumed.on_fit_start(None, Module())
    assert resumed.controller.state_dict()["steps"] == 4
    assert resumed.controller.stats()["act_ratios"] == callback.controller.stats()["act_ratios"]
