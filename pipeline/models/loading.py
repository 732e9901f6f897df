"""Load a causal LM and its tokenizer (hub id or local directory), and what is known before loading.

Remote code is never trusted. `check_model_ref`, `local_config` and `max_positions` read no weights:
pre-flight uses them to refuse a bad model before any job runs.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kernels.registry import unknown_name_message
from pipeline.specs import ModelRef

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_ref(ref: ModelRef) -> None:
    """Cheap validation before any job runs: dtype known, local path present or a hub id."""
    if ref.torch_dtype != "auto" and ref.torch_dtype not in TORCH_DTYPES:
        raise ValueError(
            unknown_name_message("torch_dtype", ref.torch_dtype, ["auto", *sorted(TORCH_DTYPES)])
        )
    path = Path(ref.name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {ref.name_or_path!r} is a file; give a model directory")
        if ref.gguf_file and not (path / ref.gguf_file).is_file():
            raise ValueError(f"gguf_file {ref.gguf_file!r} not found in {ref.name_or_path!r}")
        return
    looks_local = ref.name_or_path.startswith(("/", ".", "~")) or not HUB_ID.match(ref.name_or_path)
    if looks_local:
        raise ValueError(
            f"model {ref.name_or_path!r} is neither an existing local directory nor a hub id 'org/name'"
        )


def local_config(name_or_path: str) -> dict[str, Any] | None:
    """A local model directory's `config.json` as a dict; None for hub ids, ladders or unreadable files."""
    config = Path(name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        fields = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return fields if isinstance(fields, dict) else None


def max_positions(name_or_path: str) -> int | None:
    """The longest sequence a model takes, read without loading it: a ladder's `seq_len`, or a local
    directory's `config.json` (`max_position_embeddings` or `n_positions`); None when not known here."""
    from pipeline.ladders.ladder import is_ladder_ref, parse_ladder_ref

    if is_ladder_ref(name_or_path):
        try:
            return parse_ladder_ref(name_or_path)[0].seq_len
        except (KeyError, ValueError):
            return None  # preflight reports the bad reference itself
    return config_positions(local_config(name_or_path) or {})


def config_positions(fields: dict[str, Any]) -> int | None:
    """The positions a model config names (`max_position_embeddings`, or GPT-2's `n_positions`)."""
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(fields.get(key), int):
            return fields[key]
    return None


def resolve_torch_dtype(torch_dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere."""
    if torch_dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(unknown_name_message("torch_dtype", torch_dtype, ["auto", *sorted(TORCH_DTYPES)]))
    return TORCH_DTYPES[torch_dtype]


def load_model(ref: ModelRef, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (hub id or local directory), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_ref(ref)
    source = dict(revision=ref.revision, gguf_file=ref.gguf_file, trust_remote_code=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref.name_or_path, dtype=resolve_torch_dtype(ref.torch_dtype, device), **source
        )
        tokenizer = AutoTokenizer.from_pretrained(ref.name_or_path, **source)
    except OSError as err:
        raise ValueError(
            f"could not load model {ref.name_or_path!r}: no such local directory, and the hub "
            f"(offline here unless HF_HUB_OFFLINE is unset) did not provide it: {err}"
        ) from err
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()  # type: ignore[arg-type]
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s) on %s", ref.name_or_path, model.config.model_type, model.dtype, device)
    return model, tokenizer
