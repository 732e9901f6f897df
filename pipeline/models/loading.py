"""Load a causal LM and its tokenizer (hub id or local directory), and what is known before loading.

Remote code is never trusted. A GGUF checkpoint (`ModelRef.gguf_file`, a file in the model folder or
hub repo) is read by transformers, which dequantizes its weights to the torch dtype; it needs the
optional `gguf` package (`pip install -e '.[gguf]'`), checked in pre-flight.

`check_model_ref`, `local_config` and `max_positions` read no weights:
pre-flight uses them to refuse a bad model before any job runs: an unknown torch dtype, a folder
without config or weights, a model that is not a causal LM (BERT, T5, ...: perplexity and lm-eval
scores assume left-to-right attention), and a name that is neither a local folder nor a hub id the
hub can provide now (offline and not in the hub cache).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kernels.registry import unknown_name_message
from pipeline.hub import HUB_ID, cached_snapshot, hub_cache_dir, offline_reason
from pipeline.specs import ModelRef

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # what AutoModelForCausalLM loads (with indexes)


def check_torch_dtype(torch_dtype: str) -> None:
    """Raise ValueError naming the allowed torch dtypes unless `torch_dtype` is one (or auto)."""
    if torch_dtype != "auto" and torch_dtype not in TORCH_DTYPES:
        raise ValueError(unknown_name_message("torch_dtype", torch_dtype, ["auto", *sorted(TORCH_DTYPES)]))


def check_model_ref(ref: ModelRef) -> None:
    """Validation before any job runs, reading no weights: the torch dtype; a local folder's config,
    weights and causal-LM architecture; or a hub id's (from the hub cache, else the hub if online).

    Raises:
        ValueError: one short message naming the model and what is wrong.
    """
    check_torch_dtype(ref.torch_dtype)
    if ref.gguf_file:
        check_gguf_installed(ref.gguf_file)
    path = Path(ref.name_or_path).expanduser()
    if path.exists():
        check_local_model(path, ref)
        return
    looks_local = ref.name_or_path.startswith(("/", ".", "~")) or not HUB_ID.match(ref.name_or_path)
    if looks_local:
        raise ValueError(
            f"model {ref.name_or_path!r} is neither an existing local directory nor a hub id 'org/name'"
        )
    check_hub_model(ref)


def check_gguf_installed(gguf_file: str) -> None:
    """Raise ValueError naming the install command unless the `gguf` package (which transformers
    reads GGUF files with) can be imported."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"model.gguf_file={gguf_file!r} needs the gguf package, which is not installed: "
            "pip install -e '.[gguf]' (or pip install gguf)"
        ) from err


def check_local_model(path: Path, ref: ModelRef) -> None:
    """A local model folder: a directory with a config, weights and a causal-LM architecture."""
    name = ref.name_or_path
    if not path.is_dir():
        raise ValueError(f"model path {name!r} is a file; give a model directory")
    if ref.gguf_file:
        if not (path / ref.gguf_file).is_file():
            raise ValueError(f"gguf_file {ref.gguf_file!r} not found in {name!r}")
    elif not (path / "config.json").is_file():
        raise ValueError(f"model directory {name!r} has no config.json; give a save_pretrained folder")
    elif not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ValueError(
            f"model directory {name!r} has a config but no weights (*.safetensors or pytorch_model*.bin)"
        )
    if ref.gguf_file:  # the config is inside the GGUF file
        _check_causal(name, lambda: _auto_config(str(path), ref, local_files_only=True))
        return
    from pipeline.fingerprint import config_fact_entry, store_text

    entry = config_fact_entry(path / "config.json", CAUSAL_CACHE, str(CAUSAL_CACHE_VERSION))
    if entry is not None and entry.is_file():
        return  # this config passed before, with this transformers version
    _check_causal(name, lambda: _auto_config(str(path), ref, local_files_only=True))
    if entry is not None:
        store_text(entry, '"causal"')


CAUSAL_CACHE = "causal"  # configs found to be causal LMs, under `fingerprint.cache_base()`
CAUSAL_CACHE_VERSION = 1  # bump when `not_causal_reason` changes


def check_hub_model(ref: ModelRef) -> None:
    """A hub id: its config from the hub cache, or from the hub when it is reachable; refused when
    neither has it, naming both readings of the name."""
    name = ref.name_or_path
    snapshot = cached_snapshot(name, ref.revision)
    if snapshot is not None:
        _check_causal(name, lambda: _auto_config(str(snapshot), ref, local_files_only=True))
        return
    reason = offline_reason()
    if reason is not None:
        raise ValueError(
            f"model {name!r}: no local directory {str(Path.cwd() / name)!r}, and as a hub id it is not "
            f"in the hub cache ({hub_cache_dir()}) while the hub is unreachable ({reason}); give an "
            "existing model directory, or download the model first"
        )
    _check_causal(name, lambda: _auto_config(name, ref, local_files_only=False))


def _auto_config(source: str, ref: ModelRef, *, local_files_only: bool) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        source,
        revision=None if os.path.isdir(source) else ref.revision,
        gguf_file=ref.gguf_file,
        local_files_only=local_files_only,
        trust_remote_code=False,
    )


def _check_causal(name: str, read_config: Callable[[], PretrainedConfig]) -> None:
    """Raise ValueError unless the config `read_config()` returns is a causal LM's."""
    try:
        config = read_config()
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model {name!r}: its config cannot be read ({str(err).splitlines()[0]})") from err
    reason = not_causal_reason(config)
    if reason is not None:
        raise ValueError(f"model {name!r} is not a causal LM ({reason}); only causal LMs can be scored")


def not_causal_reason(config: PretrainedConfig) -> str | None:
    """Why a model config is not a causal (left-to-right) LM, or None if it is one.

    Causal: not an encoder-decoder, an architecture (or, without one, a model type) that transformers
    maps to a causal-LM head, and for encoder families with such a head (BERT, RoBERTa, ...)
    `is_decoder=true`, without which they attend both ways.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.model_type
    architectures = list(config.architectures or [])
    heads = {name for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in _names(value)}
    if getattr(config, "is_encoder_decoder", False):
        return f"{model_type} is an encoder-decoder"
    if architectures and not heads.intersection(architectures):
        return f"architectures {architectures} have no causal-LM head"
    if not architectures and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"model_type {model_type!r} has no causal-LM head"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return f"{model_type} attends both ways unless its config sets is_decoder=true"
    return None


def _names(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


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


def load_model(
    ref: ModelRef, device: str, gpu_budgets: Sequence[int] = ()
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (hub id or local directory), in eval mode on `device`.

    On CUDA the safetensors shards are read straight onto the GPU (no host copy of the model); with
    two or more `gpu_budgets` (bytes per GPU) the model is sharded over those GPUs by accelerate's
    device map (`pipeline.models.shard`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.shard import load_kwargs

    check_model_ref(ref)
    source = dict(revision=ref.revision, gguf_file=ref.gguf_file, trust_remote_code=False)
    placement: dict[str, Any] = {}
    if len(gpu_budgets) > 1:
        placement = load_kwargs(gpu_budgets)
    elif torch.device(device).type == "cuda" and not ref.gguf_file:
        placement = {"device_map": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref.name_or_path, dtype=resolve_torch_dtype(ref.torch_dtype, device), **source, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(ref.name_or_path, **source)
    except OSError as err:
        raise ValueError(
            f"could not load model {ref.name_or_path!r}: no such local directory, and the hub "
            f"(offline here unless HF_HUB_OFFLINE is unset) did not provide it: {err}"
        ) from err
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if not placement.get("max_memory"):  # a sharded model stays where its device map put it
        model = model.to(device)  # type: ignore[arg-type]
    model = model.eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s) on %s", ref.name_or_path, model.config.model_type, model.dtype, device)
    return model, tokenizer
