"""The pristine copy on the device or the host, and the sharded (device-map) path, on CPU devices."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.memplan import JobLoad
from pipeline.models import quantize_model_
from pipeline.models.shard import parameter_devices, plan_device_map, shard_model_
from pipeline.recipe import Recipe
from pipeline.snapshot import place_snapshot, restore_, take_snapshot

NF4_B64 = Recipe(dtype="nf", bits=4, block_size=64)


def _model(n_layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)


@pytest.mark.parametrize("where", ["gpu", "cpu"], ids=["beside-the-weights", "host"])
def test_restore_after_quantization_is_bit_identical(where):
    model = _model(2)
    pristine = _weights(model)
    snapshot = take_snapshot(model, where)
    assert snapshot.where == where and snapshot.nbytes == sum(t.numel() * 4 for t in pristine.values())
    assert all(
        t.data_ptr() != p.data_ptr()
        for t, p in zip(snapshot.tensors.values(), model.parameters(), strict=True)
    )
    quantize_model_(model, NF4_B64)
    assert not _same(_weights(model), pristine)  # the quantizer changed the weights
    addresses = [p.data_ptr() for p in model.parameters()]
    restore_(model, snapshot)
    assert _same(_weights(model), pristine)
    assert [p.data_ptr() for p in model.parameters()] == addresses  # in place, nothing reallocated


def test_snapshot_refuses_unknown_places_and_a_different_model():
    model = _model(2)
    with pytest.raises(ValueError, match=r"allowed: \['auto', 'gpu', 'cpu'\]"):
        take_snapshot(model, "disk")
    with pytest.raises(ValueError, match="resolved place"):
        take_snapshot(model, "auto")
    with pytest.raises(KeyError, match="snapshot does not match the model"):
        restore_(_model(3), take_snapshot(model, "cpu"))


def test_auto_places_the_copy_beside_a_cpu_model():
    model = _model(2)
    snapshot = place_snapshot(model, "auto", JobLoad(2, 16), 1)
    assert snapshot.where == "gpu"  # no GPU here: "beside the weights" is host memory as well
    assert place_snapshot(model, "cpu", JobLoad(2, 16), 1).where == "cpu"


def _per_block_bytes(model) -> int:
    layer = model.model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def test_device_map_places_whole_blocks_in_order_within_budgets():
    model = _model(4)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = plan_device_map(model, [total // 2 + _per_block_bytes(model), total])
    assert set(device_map.values()) == {0, 1}
    assert not any(name.startswith("model.layers.0.") for name in device_map)  # blocks never split
    order = [device_map[n] for n in device_map]
    assert order == sorted(order)  # pipeline placement: device 0's modules, then device 1's
    with pytest.raises(ValueError, match="do not fit on 2 device"):
        plan_device_map(model, [total // 8, total // 8])


def test_sharded_model_quantizes_and_restores_where_each_weight_lives():
    """Dispatched over two (CPU) devices through accelerate's hooks: the forward, the quantized weights
    and the restore equal those of the unsharded model."""
    reference, model = _model(4), _model(4)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = plan_device_map(model, [total // 2 + _per_block_bytes(model), total])
    shard_model_(model, device_map, [torch.device("cpu"), torch.device("cpu")])
    assert hasattr(model.model.layers[0], "_hf_hook") and parameter_devices(model) == [torch.device("cpu")]
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=0)
    pristine = _weights(model)
    snapshot = take_snapshot(model, "cpu")
    quantize_model_(model, NF4_B64)
    quantize_model_(reference, NF4_B64)
    assert _same(_weights(model), _weights(reference))  # per-weight quantization is placement-free
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=0)
    restore_(model, snapshot)
    assert _same(_weights(model), pristine)
