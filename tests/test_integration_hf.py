"""The Hugging Face Trainer callback: it attaches with the Trainer's optimizer (optimizer steps
counted under gradient accumulation), leaves the training batch order alone, puts its metrics in
the Trainer's logs ahead of the reporters (or warns), checkpoints the controller per process and
resumes exactly, and refuses DeepSpeed and FSDP1 arguments."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vcas  # noqa: E402
from vcas.integrations.hf import VCASCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


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


def _train(tmp_path, callback: VCASCallback | None, dataset_size: int = 48, resume=None, **overrides):
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
    trainer.train(resume_from_checkpoint=resume)
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
    torch_optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert int(next(iter(torch_optimizer.state.values()))["step"]) == 4
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


def test_default_loss_is_the_model_loss_and_the_optimizer_steps_are_counted():
    model = _model()
    batch = {"input_ids": torch.randint(1, 40, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    config = vcas.VCASConfig(update_every=1, seed=0, controller="paper")  # separate batches
    callback = VCASCallback(config, calibration_data=[batch, batch])
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    model.eval()  # no dropout, so the two losses are comparable
    assert torch.equal(callback._loss(batch), model(**batch).loss)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    assert callback.controller.stats()["steps"] == 1 and callback.controller.stats()["updates"] == 1


def test_attach_options_the_callback_passes_itself_are_refused():
    with pytest.raises(TypeError, match="optimizer"):
        VCASCallback(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


# ------------------------------------------------------------------ checkpoints
def _vcas_logs(trainer, after: int = 0):
    return [{k: v for k, v in entry.items() if k.startswith("vcas/") or k in ("step", "loss")}
            for entry in trainer.state.log_history if "vcas/s" in entry and entry["step"] > after]


def _weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_a_resumed_trainer_logs_and_trains_exactly_as_the_uninterrupted_one(tmp_path, controller):
    def callback():
        return VCASCallback(vcas.VCASConfig(update_every=2, seed=0, controller=controller),
                            loss_fn=_index_free_loss)

    # 8 steps, checkpoints every 4 (mid-epoch: 6 optimizer steps per epoch), logs every 2.
    settings = dict(max_steps=8, save_strategy="steps", save_steps=4, logging_steps=2)
    whole_callback = callback()
    whole, _, _ = _train(tmp_path / "whole", whole_callback, **settings)
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("vcas_state_*")) == ["vcas_state_0.pth"]
    saved = torch.load(checkpoint / "vcas_state_0.pth", weights_only=True)
    assert saved["controller"]["steps"] == 4
    if controller == "adaptive":  # one batch for the FLOPs measurement; the paper one calibrates on more
        assert saved["calibration"]["position"] == 1

    # Resumed in the same output_dir, as train(resume_from_checkpoint=True) would find it.
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-4")
    resumed_callback = callback()
    resumed, _, _ = _train(tmp_path / "resumed", resumed_callback, resume=str(tmp_path / "resumed" / "checkpoint-4"),
                           **settings)
    expected = _vcas_logs(whole, after=4)
    assert [entry["step"] for entry in expected] == [6, 8]
    assert _vcas_logs(resumed, after=4) == expected
    assert resumed_callback.controller.history == whole_callback.controller.history
    whole_weights, resumed_weights = _weights(whole), _weights(resumed)
    assert all(torch.equal(whole_weights[name], resumed_weights[name]) for name in whole_weights)


def test_resuming_from_a_folder_outside_output_dir_says_how_to_find_it(tmp_path):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)
    config = vcas.VCASConfig(update_every=2, seed=0, controller="paper")
    _train(tmp_path / "first", VCASCallback(config, loss_fn=_index_free_loss), **{**settings, "max_steps": 2})
    elsewhere = tmp_path / "moved" / "checkpoint-2"
    shutil.copytree(tmp_path / "first" / "checkpoint-2", elsewhere)
    with pytest.raises(vcas.ConfigError, match=r"resume_from_checkpoint=\.\.\.\) too"):
        _train(tmp_path / "second", VCASCallback(config, loss_fn=_index_free_loss), resume=str(elsewhere),
               **settings)
    # Another run's checkpoint at output_dir/checkpoint-2 is not taken for this one.
    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "third" / "checkpoint-2")
    state_file = tmp_path / "third" / "checkpoint-2" / "trainer_state.json"
    other = json.loads(state_file.read_text())
    other["log_history"][0]["loss"] += 1.0
    state_file.write_text(json.dumps(other))
    with pytest.raises(vcas.ConfigError, match="holds that Trainer state"):
        _train(tmp_path / "third", VCASCallback(config, loss_fn=_index_free_loss), resume=str(elsewhere),
               **settings)
    # Named in the TrainingArguments as well, it is found and restored.
    callback = VCASCallback(config, loss_fn=_index_free_loss)
    _train(tmp_path / "fourth", callback, resume=str(elsewhere), resume_from_checkpoint=str(elsewhere),
           **settings)
    assert callback.controller.stats()["steps"] == 4 and callback.controller.stats()["updates"] == 2
    # Saved by another number of processes: refused rather than sharing one rank's sampling draws.
    other_ranks = tmp_path / "fifth" / "checkpoint-2"
    shutil.copytree(tmp_path / "first" / "checkpoint-2", other_ranks)
    (other_ranks / "vcas_state_0.pth").rename(other_ranks / "vcas_state_1.pth")
    with pytest.raises(vcas.StateDictError, match=r"\['vcas_state_1.pth'\], none for process 0"):
        _train(tmp_path / "fifth", VCASCallback(config, loss_fn=_index_free_loss), resume=str(other_ranks),
               **settings)


def test_resuming_from_a_checkpoint_saved_without_vcas_warns_and_starts_afresh(tmp_path):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)
    _train(tmp_path, None, **{**settings, "max_steps": 2})
    callback = VCASCallback(vcas.VCASConfig(update_every=2, seed=0), loss_fn=_index_free_loss)
    with pytest.warns(UserWarning, match="holds no vcas state"):
        _train(tmp_path, callback, resume=str(tmp_path / "checkpoint-2"), **settings)
    assert callback.controller.stats()["steps"] == 2


# ------------------------------------------------------------------ reporters
def _trainer_reporting_to_tensorboard(tmp_path, callbacks):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1,
                                          per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                          remove_unused_columns=False, disable_tqdm=True, save_strategy="no")
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=Pairs(), callbacks=callbacks)
    # What the Trainer made its reporters from; the Recorder stands for the reporter itself
    # (tensorboard is not installed here), where the Trainer puts reporters: before callbacks=[...].
    trainer.args.report_to = ["tensorboard"]
    return trainer


def test_add_to_puts_the_metrics_in_front_of_reporters_and_callbacks_given_to_the_trainer_warn(tmp_path):
    config = vcas.VCASConfig(update_every=2, seed=0)

    # Given to Trainer(callbacks=[...]): it runs after the reporter, which misses the metrics,
    # and with report_to naming reporters the callback says so, once.
    callback, recorder = VCASCallback(config, loss_fn=_index_free_loss), Recorder()
    trainer = _trainer_reporting_to_tensorboard(tmp_path / "behind", [recorder, callback])
    with pytest.warns(UserWarning, match=r"add_to\(trainer\)") as caught:
        trainer.train()
        trainer.train()
    assert sum("add_to(trainer)" in str(w.message) for w in caught) == 1
    assert recorder.logs and not any("vcas/s" in log for log in recorder.logs)
    assert all("vcas/s" in entry for entry in trainer.state.log_history if "loss" in entry)

    # Added with add_to: ahead of every callback, the reporter sees the metrics, no warning.
    placed, recorder = VCASCallback(config, loss_fn=_index_free_loss), Recorder()
    trainer = _trainer_reporting_to_tensorboard(tmp_path / "ahead", [recorder])
    placed.add_to(trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*add_to")
        trainer.train()
    assert trainer.callback_handler.callbacks[0] is placed
    training_logs = [log for log in recorder.logs if "loss" in log]
    assert len(training_logs) == 2
    assert [log["vcas/s"] for log in training_logs] == \
        [entry["vcas/s"] for entry in trainer.state.log_history if "loss" in entry]


# ------------------------------------------------------------------ refused setups
@pytest.fixture
def clean_accelerate_env(monkeypatch):
    """TrainingArguments and accelerate write these; each test leaves them as they were."""
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION",
                 "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.setenv(name, "false" if name != "FSDP_VERSION" else "2")
        monkeypatch.delenv(name)
    return monkeypatch


def _args(tmp_path, **options):
    return transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)


def _init_end(callback, args):
    callback.on_init_end(args, transformers.TrainerState(), transformers.TrainerControl())


def test_fsdp1_training_arguments_are_refused_and_fsdp2_accepted(tmp_path, clean_accelerate_env):
    callback = VCASCallback()
    with pytest.raises(vcas.AttachError, match=r"fsdp_config=\{'version': 1\}\) uses FSDP1.*fsdp_version=2"):
        _init_end(callback, _args(tmp_path, fsdp=True, fsdp_config={"version": 1}))
    for fsdp_config in ({"version": 2}, {"fsdp_version": 2}, None):  # None: transformers 5's default, 2
        _init_end(callback, _args(tmp_path, fsdp=True, fsdp_config=fsdp_config))
    # transformers 4 kept fsdp options and FSDP1 unless fsdp_config said otherwise.
    legacy = _args(tmp_path)
    legacy.fsdp, legacy.fsdp_config, legacy.fsdp_plugin_args = ["full_shard"], {}, None
    with pytest.raises(vcas.AttachError, match="FSDP version 1"):
        _init_end(callback, legacy)
    legacy.fsdp_config = {"version": 2}
    _init_end(callback, legacy)


def test_an_accelerate_launch_with_fsdp1_or_deepspeed_is_refused(tmp_path, clean_accelerate_env):
    callback, args = VCASCallback(), _args(tmp_path)
    clean_accelerate_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(vcas.AttachError, match=r"FSDP_VERSION=1\) uses FSDP1"):
        _init_end(callback, args)  # accelerate's default FSDP version is 1
    clean_accelerate_env.setenv("FSDP_VERSION", "2")
    _init_end(callback, args)
    clean_accelerate_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(vcas.AttachError, match="ACCELERATE_USE_DEEPSPEED=true\\) uses DeepSpeed"):
        _init_end(callback, args)


def test_deepspeed_training_arguments_are_refused_before_training(tmp_path):
    # TrainingArguments(deepspeed=...) needs the deepspeed package to be built; the field is what
    # the callback reads, set here on arguments built without it.
    args = _args(tmp_path / "out", max_steps=1, per_device_train_batch_size=4, remove_unused_columns=False)
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    callback = VCASCallback()
    with pytest.raises(vcas.AttachError, match=r"TrainingArguments\(deepspeed=\.\.\.\) uses DeepSpeed"):
        _init_end(callback, args)
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "out2", max_steps=1,
                                                           remove_unused_columns=False),
                                   train_dataset=Pairs())
    trainer.args.deepspeed = "ds_config.json"
    with pytest.raises(vcas.AttachError, match="uses DeepSpeed"):
        callback.add_to(trainer)
    assert callback not in trainer.callback_handler.callbacks
    trainer.callback_handler.callbacks.insert(0, callback)  # placed by hand: refused when training starts
    with pytest.raises(vcas.AttachError, match="uses DeepSpeed"):
        trainer.train()
    assert callback.controller is None and not vcas.install.installation.is_attached(model)
