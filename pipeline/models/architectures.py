"""What the pipeline knows per model architecture (HF `model_type`), in one table.

`PROXY_PAIRS`: for proxy quantization, each decoder layer's attention output projection and the
inputs of its first FFN matrix (or matrices, for gated MLPs), as parameter-name suffixes.
`UNPACKABLE`: architectures the packed fast scorer cannot score (refused in pre-flight).
No torch here: pre-flight reads it.
"""

from __future__ import annotations

# Proxy quantization: model_type -> (attention output projection, inputs of the first FFN matrix),
# as suffixes of parameter names inside one decoder layer.
PROXY_PAIRS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mistral": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "qwen2": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "qwen3": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "gpt_neox": ("attention.dense.weight", ("mlp.dense_h_to_4h.weight",)),
    "opt": ("self_attn.out_proj.weight", ("fc1.weight",)),
    "gpt2": ("attn.c_proj.weight", ("mlp.c_fc.weight",)),
    "bloom": ("self_attention.dense.weight", ("mlp.dense_h_to_4h.weight",)),
}

# Architectures the packed FastScorer cannot score, found when it was built (its probe refuses them
# too, but only after the model is loaded on a worker): refused in pre-flight when the model's local
# config.json names them.
UNPACKABLE = {"bloom": "its ALiBi bias is built from a 2-D mask"}
