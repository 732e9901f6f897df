"""The memory plan: its numbers against a hand computation, the snapshot choice, and the refusals."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.memplan import (
    GIB,
    GROUP_BYTES,
    RUNTIME_BYTES,
    JobLoad,
    choose_snapshot,
    fit_problem,
    meta_shape,
    plan_memory,
)


def _config(tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tie,
    )


@pytest.fixture(scope="module")
def shape():
    return meta_shape(_config())  # bfloat16 on the meta device: nothing allocated


def test_shape_counts_match_a_hand_count(shape):
    d, f, v, layers = 64, 128, 512, 2
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # q k v o, gate up down, two norms
    n_params = v * d + layers * per_layer + d + v * d  # embeddings, blocks, final norm, untied head
    assert shape.n_params == n_params == 147_776
    assert shape.param_bytes == 2 * n_params and shape.element_bytes == 2
    assert (shape.d_model, shape.d_ff, shape.vocab_size, shape.n_layers) == (d, f, v, layers)
    assert shape.max_matrix_params == d * f  # gate/up/down; embeddings and head are not quantized
    block_h = 4 * (4 * d * d) + 4 * (2 * d * d) + 4 * f * f  # in^2 x 4 bytes per matrix
    assert shape.block_hessian_bytes == block_h and shape.hessian_bytes == layers * block_h


def test_tied_head_is_counted_once():
    assert meta_shape(_config(tie=True)).n_params == meta_shape(_config()).n_params - 512 * 64


def test_plan_items_match_a_hand_computation(shape):
    plan = plan_memory(shape, JobLoad(batch_size=4, seq_len=32), snapshot="gpu")
    tokens = 4 * 32
    items = {name: n for name, n, _ in plan.items}
    assert items["weights"] == items["snapshot"] == 295_552
    assert items["activations"] == tokens * (6 * 64 + 3 * 128) * 2
    assert items["logits"] == tokens * 512 * (2 + 4 + 4)
    assert items["method rtn"] == 2 * GROUP_BYTES + 8 * 64 * 128  # stack, output, two fp32 temporaries
    assert plan.gpu_need == sum(items.values()) and items["runtime"] == RUNTIME_BYTES
    assert plan.host_need == 0 and plan.fits  # capacity unknown: never refused
    on_host = plan_memory(shape, JobLoad(4, 32), snapshot="cpu")
    assert on_host.gpu_need == plan.gpu_need - 295_552 and on_host.host_need == 295_552
    gptq = plan_memory(shape, JobLoad(4, 32, method="gptq"), snapshot="gpu")
    assert gptq.gpu_need == plan.gpu_need + shape.block_hessian_bytes  # all Hessians: GPU only if they fit


def test_sharding_splits_weights_and_snapshot_not_the_batch(shape):
    one = plan_memory(shape, JobLoad(4, 32), snapshot="gpu", n_gpus=1)
    four = plan_memory(shape, JobLoad(4, 32), snapshot="gpu", n_gpus=4)
    assert one.gpu_need - four.gpu_need == 2 * 295_552 - 2 * 295_552 // 4


def test_auto_snapshot_goes_to_the_host_only_when_the_gpu_cannot_hold_it(shape):
    load = JobLoad(4, 32)
    gpu_need = plan_memory(shape, load, snapshot="gpu").gpu_need
    roomy, tight = [int(gpu_need / 0.95) + 1], [int((gpu_need - 295_552) / 0.95) + 1]
    assert choose_snapshot("auto", shape, load, 1, roomy) == "gpu"
    assert choose_snapshot("auto", shape, load, 1, tight) == "cpu"
    assert choose_snapshot("auto", shape, load, 1, ()) == "gpu"  # unknown: a CPU worker's copy is host anyway
    assert choose_snapshot("cpu", shape, load, 1, roomy) == "cpu"
    with pytest.raises(
        ValueError, match=r"model.snapshot='disk' is not allowed; allowed: \['auto', 'gpu', 'cpu'\]"
    ):
        choose_snapshot("disk", shape, load, 1, roomy)


def test_refusals_name_what_to_change(shape):
    load = JobLoad(64, 2048)
    fits_on_host = plan_memory(shape, JobLoad(8, 2048), snapshot="cpu").gpu_need
    capacity = [int(fits_on_host / 0.95) + 1]
    plan = plan_memory(shape, load, snapshot="gpu", gpu_capacity=capacity)
    message = fit_problem(plan, shape, load, "model 'tiny'")
    assert message is not None and message.startswith("model 'tiny': needs ")
    assert "model.snapshot=cpu" in message
    batch = int(message.split("eval.batch_size=")[1].split()[0])
    assert 8 <= batch < 64 and plan_memory(shape, dataclasses.replace(load, batch_size=batch), snapshot="cpu",
                                           gpu_capacity=capacity).fits  # fmt: skip
    # weights that no single GPU holds: more GPUs per worker
    big = dataclasses.replace(shape, param_bytes=80 * GIB)
    plan = plan_memory(big, JobLoad(1, 128), snapshot="auto", gpu_capacity=[40 * GIB])
    assert plan.snapshot == "cpu" and not plan.fits
    message = fit_problem(plan, big, JobLoad(1, 128), "model 'big'")
    assert message is not None and "ray.gpus_per_worker=3 (now 1)" in message
    assert "eval.batch_size" not in message  # no batch makes 80 GiB fit in 40
    assert fit_problem(plan_memory(big, JobLoad(1, 128), n_gpus=3, gpu_capacity=[40 * GIB] * 3), big,
                       JobLoad(1, 128), "x") is None  # fmt: skip


def test_table_prints_every_item_and_the_verdict(shape):
    text = plan_memory(shape, JobLoad(4, 32), snapshot="cpu", gpu_capacity=[80 * GIB]).table("tiny")
    assert text.splitlines()[0] == "memory plan of tiny (1 GPU(s), snapshot=cpu)"
    for item in ("weights", "snapshot", "activations", "logits", "method rtn", "runtime", "per GPU"):
        assert item in text
    assert "host (pinned)" in text and text.endswith("fits")


def test_job_load_reads_the_batch_window_method_and_adapters():
    from pipeline.calibration import CalibrationSpec
    from pipeline.jobs import Job
    from pipeline.memplan import TASK_SEQ_LEN, job_load
    from pipeline.recipe import Recipe
    from pipeline.recovery import RecoverSpec
    from pipeline.specs import EvalSpec, ModelRef, PerplexitySpec

    evals = EvalSpec(perplexity=(PerplexitySpec("w", "w.txt", context_length=128, stride=128),), batch_size=4)
    recover = RecoverSpec(method="lora", rank=4, batch_size=2, seq_len=64)
    gptq = Recipe(method="gptq", calibration=CalibrationSpec(source="corpus:train"))
    job = Job(ModelRef("m"), gptq, evals, "s", recover=recover)
    assert job_load(job) == JobLoad(4, 128, "gptq", 4, 128)
    tasks = Job(ModelRef("m"), Recipe(), dataclasses.replace(evals, tasks=("piqa",)), "s")
    assert job_load(tasks) == JobLoad(4, TASK_SEQ_LEN, "rtn", 0, 0)


def test_nvml_is_not_asked_when_the_visible_gpus_are_not_indices(monkeypatch):
    from pipeline.memplan import nvml_total_memory

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0a1b2c3d")
    assert nvml_total_memory() is None  # UUIDs cannot be mapped to NVML's order: CUDA is asked instead


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvml_totals_are_cudas_within_two_percent():
    from pipeline.memplan import nvml_total_memory

    totals = nvml_total_memory()
    cuda = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    assert totals is not None and len(totals) == len(cuda)
    assert all(abs(t - c) <= 0.02 * c for t, c in zip(totals, cuda, strict=True)), (totals, cuda)


def test_a_models_shape_and_causal_verdict_are_cached_by_its_config(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import pipeline.memplan as memplan
    from pipeline.models import loading
    from pipeline.specs import ModelRef

    monkeypatch.setenv("KBIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    memplan.model_shape.cache_clear()
    first = memplan.model_shape(str(folder), "auto", False)
    loading.check_local_model(folder, ModelRef(str(folder)))
    assert first is not None and first.n_layers == 2

    def no_modeling_code(*args, **kwargs):
        raise AssertionError("read the config with transformers again")

    monkeypatch.setattr(memplan, "meta_shape", no_modeling_code)
    monkeypatch.setattr(loading, "_auto_config", no_modeling_code)
    memplan.model_shape.cache_clear()
    assert memplan.model_shape(str(folder), "auto", False) == first  # from the disk cache
    loading.check_local_model(folder, ModelRef(str(folder)))  # passed before: not checked again

    config = folder / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    memplan.model_shape.cache_clear()
    with pytest.raises(AssertionError, match="transformers again"):  # a changed config is a miss
        memplan.model_shape(str(folder), "auto", False)
    with pytest.raises(AssertionError, match="transformers again"):
        loading.check_local_model(folder, ModelRef(str(folder)))
    memplan.model_shape.cache_clear()
