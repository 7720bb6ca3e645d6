"""PEFT adapters (LoRA) on a tiny Llama and a tiny BERT with vcas attached.

- Frozen base layers keep no input for a weight gradient they never compute: vcas at ratio 1
  saves no more for the backward than plain PyTorch on the same LoRA model.
- Their input gradient is sampled through the block samplers and counted (FLOPs), and the LoRA
  gradients stay unbiased (deterministic expectation and 400-draw statistics, with 5 % controls).
- LoRA's A and B are sampled linears; their weight gradient is sampled only where
  ``min_weight_numel`` allows; ``vcas.explain`` describes the frozen base layers and lists no
  adapter wrappers.
- ``merge_and_unload()`` is refused with the fix while vcas is attached, and after ``detach()``
  returns a plain model whose outputs equal the merged model of a run that never had vcas.
- bitsandbytes layers (QLoRA's base layers) stay exact, with the reason.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcas
from models import TinyTransformer, tiny_bert, tiny_llama, token_batch
from stats import (
    EXPECTATION_TOLERANCE,
    ScaledBernoulli,
    ScaledDraws,
    assert_unbiased,
    bias_statistics,
    biased,
    expectation_error,
    sampled_gradients,
)
from vcas.install.installation import is_attached

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
V, N, T = 64, 8, 12
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


FAMILIES = {"llama": (lambda: tiny_llama(V), "CAUSAL_LM"), "bert": (lambda: tiny_bert(V), "SEQ_CLS")}


def _lora(family: str, **options) -> nn.Module:
    """LoRA on PEFT's default targets (Llama: q_proj, v_proj; BERT: query, value), B initialised
    at random so that the adapters are no no-op; BERT's classifier is trained (modules_to_save)."""
    build, task = FAMILIES[family]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type=task,
                             **options)
    with warnings.catch_warnings():  # peft asks transformers about checkpointing by a deprecated name
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(build(), config)


def _batch(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (N, T), generator=g)
    labels = tokens if family == "llama" else torch.randint(0, 3, (N,), generator=g)
    return {"input_ids": tokens, "labels": labels}


def _loss_of(family: str, seed: int = 0):
    batch = _batch(family, seed)
    return lambda model: model(**batch).loss


def _lora_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name)]


# --------------------------------------------------------------------------- saved activations
def _saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves for the backward: distinct storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if not isinstance(tensor, nn.Parameter) and storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    return sum(storages.values())


def _plain_and_attached_bytes(family: str, unfreeze: bool = False) -> tuple[int, int]:
    plain, attached = _lora(family), _lora(family)
    if unfreeze:
        for param in [*plain.parameters(), *attached.parameters()]:
            param.requires_grad_(True)
    ctl = vcas.attach(attached, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=1.0, weight=1.0)
    return _saved_bytes(plain, _batch(family)), _saved_bytes(attached, _batch(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_base_layers_save_nothing_for_a_weight_gradient(family):
    plain, attached = _plain_and_attached_bytes(family)
    assert attached <= plain
    # Negative control: with the base weights trainable, both keep the base layers' inputs for
    # their weight gradients, and the counter sees them.
    plain_unfrozen, attached_unfrozen = _plain_and_attached_bytes(family, unfreeze=True)
    assert plain_unfrozen > plain and attached_unfrozen > attached


# --------------------------------------------------------------------------- sampling and FLOPs
def test_activation_gradients_through_frozen_linears_are_sampled_and_counted():
    """Only the frozen linears are sampled layers here (LoRA's A and B are excluded), so the
    FLOPs tally is theirs alone: one product (the input gradient) per row, none at all in the
    first block's q, k and v projections (nothing below them needs a gradient)."""
    model = _lora("llama")
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0), exclude=["lora_A", "lora_B"])
    assert all(not site.trainable for site in ctl.plan.sites)
    assert len(ctl.plan.sites) == 2 * len(LLAMA_LINEARS)
    bottom = ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")
    computing = sum(site.weight.numel() for site in ctl.plan.sites if not any(b in site.name for b in bottom))
    train = ctl.flops.train
    ctl.set_ratios(act=1.0)
    _loss_of("llama")(model).backward()
    assert train.backward_exact == 2.0 * N * T * computing  # no weight-gradient product
    assert train.backward_done == train.backward_exact  # control: nothing dropped at ratio 1
    done, exact = train.backward_done, train.backward_exact
    ctl.set_ratios(act=0.5)
    _loss_of("llama")(model).backward()
    assert train.backward_exact - exact == exact
    assert train.backward_done - done < 0.8 * exact


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_are_unbiased_at_their_expectation(family):
    model = _lora(family)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0))
    ctl.set_ratios(act=0.5, weight=0.5)
    assert ctl.weight_sampled_layers == _lora_linears(model)
    assert expectation_error(model, ctl, _loss_of(family)) < EXPECTATION_TOLERANCE
    # Negative control: keeps over-weighted by 5 %.
    assert expectation_error(model, ctl, _loss_of(family), draws=ScaledDraws(1.05)) > 10 * EXPECTATION_TOLERANCE


def _lora_bias_statistics(family: str, act: float, weight: float, factor: float | None = None) -> dict:
    reference = _lora(family)
    loss_of = _loss_of(family)
    params = [p for p in reference.parameters() if p.requires_grad]
    exact = [g.detach() for g in torch.autograd.grad(loss_of(reference), params)]
    model = _lora(family)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=1, min_weight_numel=0))
    ctl.set_ratios(act=act, weight=weight)
    if factor is not None:
        ctl.mechanism.runtime.draws = ScaledBernoulli(ctl.mechanism.runtime.generators, factor)
    return bias_statistics(sampled_gradients(model, loss_of(model), 400), exact)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_are_unbiased_statistically(family):
    assert_unbiased(_lora_bias_statistics(family, act=0.5, weight=0.5))


def test_lora_statistics_detect_a_five_percent_over_weighting():
    assert biased(_lora_bias_statistics("llama", act=1.0, weight=0.3, factor=1.05))


def test_lora_trains_with_the_adaptive_controller_and_the_base_stays_frozen():
    model = _lora("llama")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0, update_every=2, tau_act=10.0,
                                             tau_w=10.0), optimizer=optimizer)
    assert ctl.config.controller == "adaptive"
    assert sorted(ctl.measured_parameters) == sorted(_lora_linears(model))
    losses = []
    for step in range(8):
        loss = _loss_of("llama", step % 2)(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    stats = ctl.stats()
    assert stats["updates"] >= 2 and min(stats["act_ratios"] + stats["weight_ratios"]) < 1.0
    assert losses[-1] < losses[0]
    batches = (_batch("llama", seed) for seed in range(100, 200))
    check = ctl.check_variance(lambda batch: model(**batch).loss, batches, min_pairs=2, max_pairs=2)
    assert check["pairs"] == 2 and check["act_ratio"] >= 0 and check["weight_ratio"] >= 0
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)


# --------------------------------------------------------------------------- explain
def test_explain_describes_frozen_base_layers_and_lists_no_adapter_wrappers():
    model = _lora("llama")
    report = vcas.explain(model)
    sampled = {r.name: r.detail for r in report.sampled}
    frozen = [name for name, detail in sampled.items() if detail.startswith("linear, frozen weight")]
    # The targeted projections' base layers and the untargeted linears: all frozen.
    assert len(frozen) == 2 * len(LLAMA_LINEARS)
    assert all(name.endswith((".q_proj.base_layer", ".v_proj.base_layer"))
               or name.rsplit(".", 1)[-1] in LLAMA_LINEARS for name in frozen)
    assert "no input kept" in sampled[frozen[0]] and "sampled through the block samplers" in sampled[frozen[0]]
    lora = _lora_linears(model)
    assert sorted(set(sampled) - set(frozen)) == sorted(lora)
    assert all("weight gradient exact (fewer than min_weight_numel" in sampled[name] for name in lora)
    assert all("samples the weight gradient" in r.detail
               for r in vcas.explain(model, min_weight_numel=0).sampled if r.name in lora)
    # PEFT's wrappers (q_proj itself, the lora_A / lora_dropout containers) own no parameters of
    # their own and appear nowhere; the exact list holds only embeddings, norms and the head.
    listed = [r.name for r in report.blocks + report.sampled + report.exact]
    assert not any(name.endswith((".q_proj", ".lora_A", ".lora_B", ".lora_dropout")) for name in listed)
    assert all(r.type_name in ("Embedding", "LlamaRMSNorm", "Linear") for r in report.exact)
    assert f"({len(sampled)} Linear; {len(frozen)} with a frozen weight)" in report.summary()
    text = str(report)
    assert "q_proj.base_layer  [Linear]  linear, frozen weight" in text


# --------------------------------------------------------------------------- merging
def _merged_reference(state: dict[str, torch.Tensor]) -> nn.Module:
    """The merged model of a LoRA model with these weights that never had vcas attached."""
    model = _lora("llama")
    model.load_state_dict(state)
    return model.merge_and_unload()


def test_merge_and_unload_is_refused_while_attached_and_plain_after_detach():
    model = _lora("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0), optimizer=optimizer)
    ctl.set_ratios(act=0.5, weight=0.5)
    for step in range(2):
        _loss_of("llama", step)(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    for unload in (model.merge_and_unload, model.unload, model.base_model.merge_and_unload):
        with pytest.raises(vcas.AttachError, match=r"controller\.detach\(\) first"):
            unload()
    assert len(_lora_linears(model)) == 8  # nothing was replaced: training goes on
    _loss_of("llama")(model).backward()
    ctl.detach()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    tokens = _batch("llama")["input_ids"]
    with torch.no_grad(), model.disable_adapter():
        base_only = model(input_ids=tokens).logits
    merged = model.merge_and_unload()
    assert not is_attached(merged) and type(merged) is transformers.LlamaForCausalLM
    assert not any("forward" in m.__dict__ or "merge_and_unload" in m.__dict__ for m in merged.modules())
    copy.deepcopy(merged)  # an attached model refuses copies; this one is plain
    reference = _merged_reference(state)
    with torch.no_grad():
        got, want = merged(input_ids=tokens).logits, reference(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, base_only, atol=1e-4)  # control: the adapters were merged


def test_merging_in_place_works_while_attached():
    model = _lora("llama")
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    tokens = _batch("llama")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        model.merge_adapter()  # replaces no module: the sampled base layers read the merged weight
        merged = model(input_ids=tokens).logits
        model.unmerge_adapter()
        after = model(input_ids=tokens).logits
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    ctl.detach()


# --------------------------------------------------------------------------- QLoRA base layers
class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes' quantized linear (not installable without CUDA)."""


Linear4bit.__module__ = "bitsandbytes.nn.modules"


class MyLinear(nn.Linear):
    """A subclass of nn.Linear from elsewhere: exact too, with another reason."""


def _with_linear(cls: type) -> TinyTransformer:
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    for block in model.blocks:
        old = block.mlp[0]
        block.mlp[0] = cls(old.in_features, old.out_features)
    return model


def test_bitsandbytes_layers_stay_exact_with_the_reason_and_the_rest_is_unbiased():
    model = _with_linear(Linear4bit)
    exact = {r.name: r.detail for r in vcas.explain(model).exact}
    for name in ("blocks.0.mlp.0", "blocks.1.mlp.0"):
        assert exact[name].startswith("quantized layer (Linear4bit, bitsandbytes): its backward stays exact")
    assert not any(r.name.endswith("mlp.0") for r in vcas.explain(model).sampled)
    tokens, labels = token_batch(n=8, t=6)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0))
    ctl.set_ratios(act=0.5, weight=0.5)
    assert expectation_error(model, ctl, lambda m: F.cross_entropy(m(tokens), labels)) < EXPECTATION_TOLERANCE
    # Control: another nn.Linear subclass is exact for another reason (register it if plain).
    other = {r.name: r.detail for r in vcas.explain(_with_linear(MyLinear)).exact}
    assert other["blocks.0.mlp.0"].startswith("subclass of nn.Linear (MyLinear)")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_flops_accounting_matches_an_independent_count_with_adapters_initialised_as_peft_does(family):
    """PEFT starts B at zero, so the first backward gives every A an all-zero gradient, which
    the sampled layers skip: the one-off measurement of the model's other work must not read
    those skipped products as negative other work (0.92 on a BERT with LoRA everywhere if it
    does). At ratio 0.5 the blocks recompute compactly, their first uses verifying themselves
    with two re-runs, which count as what they ran (the model's work outside the block not
    charged for them)."""
    build, task = FAMILIES[family]
    torch.manual_seed(0)
    targets = list(LLAMA_LINEARS) if family == "llama" else ["query", "key", "value", "dense"]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type=task, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(build(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, controller="adaptive"))
    ctl.measure_flops(lambda _batch: _loss_of(family, seed=0)(model), None)

    def step(seed):
        _loss_of(family, seed)(model).backward()
        optimizer.step()
        optimizer.zero_grad()

    ratios = []
    for seed, act in ((1, 1.0), (2, 1.0), (3, 0.5)):
        ctl.set_ratios(act=act, weight=1.0)
        ratios.append(ctl.check_flops(lambda seed=seed: step(seed))["ratio"])
    assert ratios == pytest.approx([1.0] * 3, rel=1e-6), ratios
    ctl.detach()
