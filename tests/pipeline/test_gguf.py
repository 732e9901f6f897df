"""GGUF checkpoints as first-class models: a tiny Llama written with the `gguf` package, loaded through
`pipeline.models.loading`, quantized and scored; pre-flight and labels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.jobs import single_source
from pipeline.models import check_model_ref, load_model, quantize_model_
from pipeline.specs import ModelRef

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer, file: Path) -> Path:
    """`model` (a LlamaForCausalLM) and its byte-level BPE `tokenizer` as a float32 GGUF file."""
    config = model.config
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    names |= {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    names |= {
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    tensors = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    tensors["output.weight"] = "lm_head.weight"
    for i in range(config.num_hidden_layers):
        tensors |= {
            f"blk.{i}.{short}.weight": f"model.layers.{i}.{long}.weight" for long, short in names.items()
        }
    state = model.state_dict()
    for name, source in tensors.items():
        weight = state[source].float().numpy()
        if ".attn_q." in name:
            weight = _permute(weight, config.num_attention_heads)
        elif ".attn_k." in name:
            weight = _permute(weight, config.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


@pytest.fixture(scope="module")
def gguf_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two GGUF files of the tiny Llama (the second with one weight changed)."""
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir), torch_dtype="float32"), "cpu")
    folder = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(model, tokenizer, folder / "tiny-f32.gguf")
    model.model.norm.weight.data.mul_(0.5)
    write_llama_gguf(model, tokenizer, folder / "tiny-other.gguf")
    return folder


def test_gguf_loads_with_the_same_logits_and_tokens(gguf_dir, tiny_model_dir):
    import torch

    reference, ref_tokenizer = load_model(ModelRef(str(tiny_model_dir), torch_dtype="float32"), "cpu")
    model, tokenizer = load_model(ModelRef(str(gguf_dir), "float32", gguf_file="tiny-f32.gguf"), "cpu")
    text = "And God said, Let there be light: and there was light."
    ids = ref_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
        torch.testing.assert_close(model(torch.tensor([ids])).logits, expected, rtol=1e-4, atol=1e-4)


def test_gguf_quantizes_and_scores_end_to_end(gguf_dir, data_root):
    from kernels import QuantSpec
    from pipeline.evals.evaluate import Evaluator
    from pipeline.recipe import Recipe
    from pipeline.specs import EvalSpec, PerplexitySpec

    model, tokenizer = load_model(ModelRef(str(gguf_dir), "float32", gguf_file="tiny-f32.gguf"), "cpu")
    text = PerplexitySpec("wikitext2", "eval/wikitext-2-raw/wiki.test.raw", 64, 64, max_tokens=256)
    evaluator = Evaluator(model, tokenizer, EvalSpec(perplexity=(text,), data_root=str(data_root)))
    before = {m.metric: m.value for m in evaluator.run()}
    report = quantize_model_(model, Recipe.of(QuantSpec(dtype="int", bits=3, block_size=64)))
    after = {m.metric: m.value for m in evaluator.run()}
    assert report.n_quantized_params > 0 and after["perplexity"] != before["perplexity"]


def test_two_files_of_one_folder_get_distinct_labels_and_keys(gguf_dir):
    from pipeline.fingerprint import pin_model

    refs = [ModelRef(str(gguf_dir), gguf_file=name) for name in ("tiny-f32.gguf", "tiny-other.gguf")]
    labels = [single_source(ref)[0].label for ref in refs]
    assert labels == [f"{gguf_dir}/tiny-f32.gguf", f"{gguf_dir}/tiny-other.gguf"]
    assert len({pin_model(ref)[1] for ref in refs}) == 2


def test_missing_gguf_package_is_refused_in_preflight(gguf_dir, monkeypatch):
    ref = ModelRef(str(gguf_dir), gguf_file="tiny-f32.gguf")
    check_model_ref(ref)
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when it is not installed
    with pytest.raises(ValueError, match=r"gguf_file='tiny-f32.gguf' needs the gguf package.*\[gguf\]"):
        check_model_ref(ref)
