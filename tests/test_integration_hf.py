"""The Hugging Face Trainer callback: optimizer-step counting under gradient accumulation,
an undisturbed training batch order, metrics in the Trainer's logs, and AMP-skipped steps."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vcas  # noqa: E402
from vcas.integrations.hf import VCASCallback  # noqa: E402


class Pairs(torch.utils.data.Dataset):
    """Token sequences labelled by whether token 5 occurs in them."""

    def __init__(self, n: int = 48, t: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 40, (n, t), generator=g)
        self.labels = (self.ids == 5).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "index": torch.tensor(i)}


class Recorder(transformers.TrainerCallback):
    """Stands for a reporting integration (TensorBoard, W&B): what it sees in on_log."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _model():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def _train(tmp_path, callback: VCASCallback | None, dataset_size: int = 48, **overrides):
    model = _model()
    seen: list[list[int]] = []

    def record_training_batch(module, args, kwargs):
        # Training batches carry their dataset indices; calibration's loss_fn strips them.
        if "index" in kwargs:
            seen.append(kwargs.pop("index").tolist())
        return args, kwargs

    model.register_forward_pre_hook(record_training_batch, with_kwargs=True)
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                    gradient_accumulation_steps=2, logging_steps=2, learning_rate=1e-3,
                    num_train_epochs=1, save_strategy="no", report_to="none", use_cpu=True,
                    seed=0, remove_unused_columns=False, disable_tqdm=True)
    settings.update(overrides)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                   train_dataset=Pairs(dataset_size), callbacks=[Recorder()])
    if callback is not None:
        callback.add_to(trainer)
    trainer.train()
    recorder = next(c for c in trainer.callback_handler.callbacks if isinstance(c, Recorder))
    return trainer, seen, recorder


def _index_free_loss(model, batch):
    batch = {k: v for k, v in batch.items() if k != "index"}
    return model(**batch).loss


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_trainer_callback_calibrates_per_optimizer_step_and_logs(tmp_path, controller):
    config = vcas.VCASConfig(update_every=2, seed=0, controller=controller)
    callback = VCASCallback(config, loss_fn=_index_free_loss)
    trainer, _, recorder = _train(tmp_path, callback)
    stats = callback.controller.stats()
    # 4 optimizer steps of 2 micro-batches each: counted 4; the paper's controller calibrates
    # every 2, the adaptive one on the first step (both micro-batches) and then at most 2 apart.
    assert stats["steps"] == 4
    if controller == "paper":
        assert stats["updates"] == 2
    else:
        assert stats["updates"] >= 2 and callback.controller.history[0]["step"] == 1
    assert callback.controller.model is trainer.model
    expected = {"vcas/s", "vcas/mean_act_ratio", "vcas/mean_weight_ratio", "vcas/var_act_over_sgd",
                "vcas/var_weight_over_sgd", "vcas/bp_flops_reduction", "vcas/train_flops_reduction"}
    training_logs = [log for log in recorder.logs if "loss" in log]
    assert training_logs and all(expected <= set(log) for log in training_logs)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(expected <= set(entry) for entry in history)
    assert history[-1]["vcas/s"] == stats["s"]


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_trainer_batch_order_is_the_same_with_and_without_vcas(tmp_path, controller):
    # Two epochs: the second epoch's order is drawn from the global RNG at its start.
    overrides = dict(max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=1,
                     per_device_train_batch_size=8)
    _, plain, _ = _train(tmp_path / "plain", None, dataset_size=24, **overrides)
    config = vcas.VCASConfig(update_every=2, seed=0, controller=controller)
    callback = VCASCallback(config, loss_fn=_index_free_loss)
    _, with_vcas, _ = _train(tmp_path / "vcas", callback, dataset_size=24, **overrides)
    assert callback.controller.stats()["updates"] >= 3 and len(plain) == 6
    assert with_vcas == plain


def test_default_loss_is_the_model_loss_and_skipped_amp_steps_are_not_counted():
    model = _model()
    batch = {"input_ids": torch.randint(1, 40, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    config = vcas.VCASConfig(update_every=1, seed=0, controller="paper")  # separate batches
    callback = VCASCallback(config, calibration_data=[batch, batch])
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    model.eval()  # no dropout, so the two losses are comparable
    assert torch.equal(callback._loss(batch), model(**batch).loss)
    model.train()

    class SkippedStep:
        step_was_skipped = True  # what accelerate's optimizer reports after an fp16 overflow

    callback.on_step_end(args, state, control, optimizer=SkippedStep())
    assert callback.controller.stats()["steps"] == 0
    callback.on_step_end(args, state, control, optimizer=object())
    assert callback.controller.stats()["steps"] == 1 and callback.controller.stats()["updates"] == 1
