"""Built-in tasks of LLM-style training on BBC News, small enough for a CPU.

- ``bbc-minilm-lora``: LoRA (``peft``) fine-tuning of the pretrained MiniLM on the BBC News topics:
  adapters of rank 8 on every query, key, value and dense projection, the classifier head trained
  in full; the frozen base layers backpropagate only the input gradient.
- ``bbc-lm``: a small Llama trained from scratch as a causal language model on the BBC News
  article text, tokenized with MiniLM's tokenizer and packed into fixed-length chunks (no
  padding: every token is predicted); held-out articles give the perplexity.

Data and weights ship inside registry packages (see :mod:`vcas_lab.data`): nothing downloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import data
from .tasks import LANGUAGE_MODELING, Task, TaskError, load_tokenizer, offline, text_classification

# LoRA on the MiniLM classifier.
LORA_RANK = 8
LORA_TARGETS = ("query", "key", "value", "dense")

# The causal language model. Its cost per token is dominated by the 30522-word vocabulary (output
# layer and loss): an epoch over the 1727 training articles is about 400 steps of 16 chunks of 128
# tokens, 5 to 10 minutes on 2 CPU cores. 100 held-out articles keep each evaluation short.
LM_LAYERS, LM_HIDDEN, LM_HEADS, LM_INTERMEDIATE = 4, 256, 4, 688
LM_EVAL_ARTICLES = 100


def bbc_minilm_lora(max_length: int = 128) -> Task:
    """LoRA (rank 8 on query, key, value and dense) on the pretrained MiniLM classifying BBC News
    (5 topics); the classifier head is trained in full (peft's ``modules_to_save``)."""
    offline()
    _require_peft()
    train_x, train_y, test_x, test_y, classes = data.load_bbc_news()
    task = text_classification(
        "bbc-minilm-lora", data.minilm_path(), train_x, train_y, test_x, test_y, len(classes), max_length,
        f"LoRA (rank {LORA_RANK} on query/key/value/dense) on the pretrained all-MiniLM-L6-v2, "
        "classifying BBC News (5 topics)", lr=5e-4, epochs=3.0)
    return dataclasses.replace(task, build_model=_with_lora(task.build_model))


def lora_model(model: nn.Module) -> nn.Module:
    """``model`` (a sequence classifier) with LoRA adapters on :data:`LORA_TARGETS` and its
    classifier head trainable: the PEFT model."""
    import peft

    config = peft.LoraConfig(task_type="SEQ_CLS", r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.1,
                             target_modules=list(LORA_TARGETS))
    return peft.get_peft_model(model, config)


def _with_lora(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build_lora() -> nn.Module:
        return lora_model(build())
    return build_lora


def _require_peft() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise TaskError("the task bbc-minilm-lora needs the peft package: pip install peft")


# --------------------------------------------------------------------- language modelling
def bbc_lm(chunk: int = 128) -> Task:
    """A Llama (4 x 256) trained from scratch on BBC News articles as a causal language model.

    The training articles and 100 held-out ones, each split in a fixed random order (the splits
    are sorted by topic, so that ``--train-limit`` keeps every topic), are tokenized with MiniLM's
    tokenizer (vocabulary 30522, the model's too), each followed by its separator token,
    concatenated and cut into chunks of ``chunk`` tokens (the remainder dropped).
    """
    offline()
    train_x, _, test_x, _, _ = data.load_bbc_news()
    tokenizer = load_tokenizer(data.minilm_path())
    train = pack_texts(tokenizer, _articles(train_x, len(train_x), seed=0), chunk)
    held_out = pack_texts(tokenizer, _articles(test_x, LM_EVAL_ARTICLES, seed=1), chunk)
    config = lm_config(tokenizer, chunk)

    def build() -> nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(config)

    return Task("bbc-lm", f"Llama ({LM_LAYERS} x {LM_HIDDEN}) trained from scratch as a causal language model "
                f"on {len(train_x)} BBC News articles (MiniLM tokenizer, {train.shape[0]} chunks of "
                f"{chunk} tokens); perplexity on {LM_EVAL_ARTICLES} held-out articles",
                {"input_ids": train}, {"input_ids": held_out}, build, LANGUAGE_MODELING,
                lr=1e-3, batch_size=16, epochs=1.0)


def _articles(texts: list[str], count: int, seed: int) -> list[str]:
    """``count`` of ``texts`` in a fixed random order (the splits are sorted by topic)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:count]
    return [texts[i] for i in order.tolist()]


def lm_config(tokenizer: Any, positions: int) -> Any:
    """The small Llama's config: the tokenizer's vocabulary, ``positions`` positions, no cache."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=LM_HIDDEN, intermediate_size=LM_INTERMEDIATE,
                       num_hidden_layers=LM_LAYERS, num_attention_heads=LM_HEADS, num_key_value_heads=LM_HEADS,
                       max_position_embeddings=positions, tie_word_embeddings=True, use_cache=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id)


def pack_texts(tokenizer: Any, texts: list[str], chunk: int) -> torch.Tensor:
    """``texts`` tokenized (no special tokens), each followed by the separator token,
    concatenated, and cut into rows of ``chunk`` tokens; the incomplete last row is dropped.

    Raises:
        TaskError: the texts hold fewer than ``chunk`` tokens.
    """
    if chunk < 2:
        raise TaskError(f"--max-length {chunk}: a language-model chunk needs at least 2 tokens")
    separator = tokenizer.sep_token_id
    ids: list[int] = []
    for tokens in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids += tokens + [separator]
    rows = len(ids) // chunk
    if rows == 0:
        raise TaskError(f"the texts hold {len(ids)} tokens, fewer than one chunk of {chunk}")
    return torch.tensor(ids[:rows * chunk], dtype=torch.long).view(rows, chunk)
