"""Train one size of a wsd ladder: one stable run, and a cool-down branch per kept token count.

The stable run (warm-up, then the peak rate) stops at each kept count's `cooldown_start`; a copy of
the model and of the optimizer state then cools down to the kept count and is saved as that member,
and the stable run continues from where it stopped. Every step uses the same data order as a single
straight run, so the member kept at T steps is exactly the model a straight T-step run with that
branch's schedule would give (tests check this), and one stable run yields all of a size's members.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.ladders.configs import LadderConfig, ModelSize
from pipeline.ladders.schedule import cooldown_start
from pipeline.ladders.train import (
    LadderData,
    MemberMetadata,
    build_model,
    check_windows,
    evaluate_loss,
    lr_at,
    make_optimizer,
    member_metadata,
    run_steps,
    save_member,
    training_device,
    window_order,
)

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

log = logging.getLogger(__name__)


def branch_copy(
    model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, config: LadderConfig
) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    """An independent copy of `model` and of `optimizer`'s state (Adam moments, step counts).

    `load_state_dict` would keep the very tensors it is given, so the state is deep-copied first:
    the branch's updates must never reach the stable run's moments.
    """
    branch = copy.deepcopy(model)
    branch_optimizer = make_optimizer(branch, config, next(branch.parameters()).device)
    branch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return branch, branch_optimizer


def train_branches(
    config: LadderConfig, size: ModelSize, data: LadderData, out_dirs: Mapping[int, Path]
) -> list[MemberMetadata]:
    """Train size `size` of the wsd ladder `config`, saving the member kept at T tokens into
    `out_dirs[T]` for each T given (a subset of `config.keep_tokens`); returns their metadata."""
    unknown = sorted(set(out_dirs) - set(config.keep_tokens))
    if config.schedule != "wsd" or unknown:
        raise ValueError(f"ladder {config.name!r} (schedule {config.schedule!r}) keeps no members at "
                         f"{unknown}; it keeps {list(config.keep_tokens)}")  # fmt: skip
    label, peak = f"{config.name}/{size.name}", size.lr or config.lr
    if config.tokens > len(data.train_ids):
        passes = config.tokens / len(data.train_ids)
        log.info("%s: up to %.1f passes over the %d training tokens (repeated epochs)", label, passes,
                 len(data.train_ids))  # fmt: skip
    saved: list[MemberMetadata] = []
    with training_device() as device:
        start_s = time.perf_counter()
        model = build_model(config, size, data.tokenizer)
        model.to(device)  # type: ignore[arg-type]  # in place; transformers types .to oddly
        n_windows = check_windows(data.train_ids, config, label)
        order = window_order(config.steps, config.batch_size, n_windows, config.seed)
        run = functools.partial(run_steps, train_ids=data.train_ids, order=order, config=config, label=label)
        optimizer, step = make_optimizer(model, config, device), 0
        for tokens in sorted(out_dirs):
            keep = tokens // config.tokens_per_step
            branch_at = cooldown_start(keep, config.cooldown_frac)
            run(
                model,
                optimizer,
                steps=range(step, branch_at),
                lr_of=functools.partial(lr_at, config=config, peak=peak),
            )
            step = branch_at
            branch, branch_optimizer = branch_copy(model, optimizer, config)
            lr_of = functools.partial(lr_at, config=config, peak=peak, keep_steps=keep)
            losses = run(branch, branch_optimizer, steps=range(branch_at, keep), lr_of=lr_of)
            val_loss, val_tokens = evaluate_loss(branch, data.heldout_ids, config)
            train_loss = float(np.mean(losses[-max(1, keep // 10) :]))
            wall_s = time.perf_counter() - start_s
            metadata = member_metadata(
                config, size, branch, keep, (train_loss, val_loss, val_tokens), wall_s, device, branch_at
            )
            log.info("%s: kept %d tokens (cool-down from step %d), validation loss %.4f", label, tokens,
                     branch_at, val_loss)  # fmt: skip
            save_member(branch, data, metadata, out_dirs[tokens])
            saved.append(metadata)
    return saved
