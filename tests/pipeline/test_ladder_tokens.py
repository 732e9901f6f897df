"""The training-token axis (issue 21): wsd ladders, cool-down branches, `@<tokens>` refs, `train_tokens`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ladders.configs import LADDERS, config_hash, get_ladder, smoke_config, tuning_config
from pipeline.ladders.ladder import (
    LadderMember,
    cached_ladder,
    ladder_dir,
    parse_ladder_ref,
    parse_member_ref,
    parse_seeded_members,
    resolve_ladder,
)
from pipeline.ladders.schedule import cooldown_start, wsd_lr
from pipeline.ladders.train import MemberMetadata, lr_at, member_train_tokens
from pipeline.results import SCHEMA, SCHEMA_VERSION_KEY, load_results, schema_columns, write_job_rows

if TYPE_CHECKING:
    import torch

TOKENS = get_ladder("test-tokens")
V1_DIR = Path(__file__).parent.parent / "fixtures" / "results-v1"


def reference_lr(
    step: int, keep_steps: int | None, warmup: int, peak: float, floor: float, frac: float
) -> float:
    """WSD written out plainly: warm-up, the peak, and a straight line from the peak at the branch
    start to `floor` at the branch's last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if keep_steps is None:
        return peak
    branch_at = int(np.floor(keep_steps * (1 - frac) + 0.5))
    if step < branch_at:
        return peak
    return float(np.interp(step, [branch_at - 1, keep_steps - 1], [peak, floor]))


def test_existing_ladders_keep_their_hashes() -> None:
    hashes = {name: config_hash(LADDERS[name]) for name in ("test", "tiny", "demo", "h100")}
    assert hashes == {
        "test": "60902f15847b",
        "tiny": "b94b65262102",
        "demo": "074bf4e21973",
        "h100": "578de6f8b6cf",
    }
    assert config_hash(TOKENS) != config_hash(dataclasses.replace(TOKENS, cooldown_frac=0.25))


def test_h100_tokens_is_the_h100_ladder_kept_at_six_counts() -> None:
    h100, tokens = get_ladder("h100"), get_ladder("h100-tokens")
    assert [s.name for s in tokens.sizes] == ["d128", "d192", "d256", "d320"]
    assert tokens.sizes == h100.sizes[:4] and tokens.schedule == "wsd" and tokens.cooldown_frac == 0.2
    same = ("vocab_size", "seq_len", "batch_size", "lr", "min_lr_ratio", "seed", "weight_decay")
    assert all(getattr(tokens, f) == getattr(h100, f) for f in same)
    keep = np.array(tokens.keep_tokens)
    assert len(keep) == 6 and (keep % 32_768 == 0).all() and tokens.tokens == keep[-1]
    assert abs(keep[0] - 2.5e6) <= 16_384 and abs(keep[-1] - 40e6) <= 16_384
    ratios = keep[1:] / keep[:-1]
    assert np.allclose(ratios, 16 ** (1 / 5), rtol=0.01)  # geometric up to whole steps
    assert tokens.warmup_steps <= cooldown_start(tokens.keep_steps[0], 0.2)


def test_bad_wsd_configs_fail_naming_the_value() -> None:
    base = TOKENS
    cases = [
        (dict(schedule="linear"), "schedule 'linear'"),
        (dict(schedule="cosine"), "needs schedule='wsd'"),
        (dict(keep_tokens=(20_480, 10_240, 40_960)), "strictly increasing"),
        (dict(keep_tokens=(10_000, 40_960)), r"\[10000\] .* not whole steps of 512"),
        (dict(steps=100), "steps=100 .* must be its largest kept count"),
        (dict(warmup_steps=17), "warmup_steps=17 .* first cool-down, which starts at step 16"),
        (dict(cooldown_frac=1.0), "cooldown_frac"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(base, **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--steps does not apply"):
        tuning_config(base, steps=50)
    smoke = smoke_config(base, 45)  # keeps the counts within the cap
    assert smoke.keep_tokens == (10_240, 20_480) and smoke.steps == 40
    assert smoke_config(base, 3).keep_tokens == (3 * 512,)


@pytest.mark.parametrize("keep", [None, *TOKENS.keep_steps, *get_ladder("h100-tokens").keep_steps])
def test_wsd_schedule_matches_the_reference(keep: int | None) -> None:
    config = TOKENS if keep is None or keep <= TOKENS.steps else get_ladder("h100-tokens")
    peak, floor = 2e-3, 2e-3 * config.min_lr_ratio
    end = keep or config.steps
    rates = [lr_at(step, config, peak, keep) for step in range(end)]
    expected = [
        reference_lr(s, keep, config.warmup_steps, peak, floor, config.cooldown_frac) for s in range(end)
    ]
    assert rates == pytest.approx(expected, rel=1e-12)
    if keep is None:
        assert rates[config.warmup_steps :] == [peak] * (end - config.warmup_steps)  # constant stable run
        return
    branch_at = cooldown_start(keep, config.cooldown_frac)
    assert branch_at == round(keep * (1 - config.cooldown_frac))  # T·(1−frac) (no .5 ties in these ladders)
    assert rates[config.warmup_steps : branch_at] == [peak] * (branch_at - config.warmup_steps)
    assert rates[-1] == pytest.approx(floor)  # every member ends at the same rate
    steps = np.diff([peak, *rates[branch_at:]])
    assert np.allclose(steps, steps[0]) and steps[0] < 0  # linear decay
    stable = [lr_at(s, config, peak) for s in range(branch_at)]
    assert rates[:branch_at] == stable  # the branch starts from the stable run


def test_cooldown_start_always_leaves_a_cooldown_step() -> None:
    assert cooldown_start(1, 0.2) == 0 and cooldown_start(2, 0.2) == 1 and cooldown_start(80, 0.2) == 64
    assert wsd_lr(0, 0, 1.0, 0.1, keep_steps=1) == pytest.approx(0.1)


def test_member_refs_expand_and_pick_kept_counts() -> None:
    config, keys = parse_member_ref("ladder:test-tokens")
    assert config == TOKENS and len(keys) == 9
    assert [k.folder for k in parse_member_ref("ladder:test-tokens/xs")[1]] == [
        "xs@10240",
        "xs@20480",
        "xs@40960",
    ]
    for spelling in ("40960", "41k", "0.041M", "40.96k"):
        assert [k.folder for k in parse_member_ref(f"ladder:test-tokens/0@{spelling}")[1]] == ["xs@40960"]
    assert [k.folder for k in parse_member_ref("ladder:test-tokens@10240")[1]] == [
        "xs@10240",
        "s@10240",
        "m@10240",
    ]
    assert parse_ladder_ref("ladder:test-tokens/s@20480") == (TOKENS, (TOKENS.sizes[1],))
    seeded = parse_seeded_members("ladder:test-tokens/xs@20480+seeds2")
    assert [c.seed for c, _ in seeded] == [TOKENS.seed, TOKENS.seed + 1]
    assert all([k.folder for k in keys] == ["xs@20480"] for _, keys in seeded)
    assert [k.folder for k in parse_member_ref("ladder:test/xs")[1]] == ["xs"]  # one member per size


@pytest.mark.parametrize(
    ("ref", "error", "match"),
    [
        (
            "ladder:test-tokens/xs@30000",
            ValueError,
            r"30000 tokens\) is not a kept count .* allowed: 10240 \(10.2k\)",
        ),
        ("ladder:test-tokens/xs@20k", ValueError, "allowed: 10240"),  # 2.4% off 20,480
        (
            "ladder:test-tokens/xs@many",
            ValueError,
            "'many' is not an integer or a number with a k/M/B suffix",
        ),
        ("ladder:test-tokens/xs@0", ValueError, "must be >= 1"),
        ("ladder:test/xs@10240", ValueError, "keeps one member per size .* drop '@10240'"),
        ("ladder:test-tokens/xl@10240", KeyError, "allowed: xs, s, m"),
        ("ladder:test-tokens/xs@10240+seeds0", ValueError, "N >= 1"),
    ],
)
def test_bad_member_refs_fail_clearly(ref: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_member_ref(ref)


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Iterator[list[LadderMember]]:
    """The xs size of test-tokens, trained once (one thread: the reference run must match bit for bit)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KBIT_CACHE", str(tmp_path_factory.mktemp("kbit_cache")))
        patch.setenv("KBIT_TRAIN_THREADS", "1")
        yield resolve_ladder("ladder:test-tokens/xs", data_root)


def test_one_run_keeps_every_count_as_its_own_member(members: list[LadderMember]) -> None:
    assert [m.tokens_seen for m in members] == list(TOKENS.keep_tokens)
    assert [m.name for m in members] == ["xs@10240", "xs@20480", "xs@40960"]
    folder = ladder_dir(TOKENS)
    for member, keep in zip(members, TOKENS.keep_steps, strict=True):
        meta = MemberMetadata.read(Path(member.path))
        assert Path(member.path).parent == folder and meta.steps == keep
        assert meta.branch and meta.cooldown_start_step == cooldown_start(keep, TOKENS.cooldown_frac)
        assert meta.train_tokens == member_train_tokens(member.path) == keep * TOKENS.tokens_per_step
    assert cached_ladder("ladder:test-tokens/xs") == members
    assert cached_ladder("ladder:test-tokens/xs@20480") == [members[1]]
    assert cached_ladder("ladder:test-tokens/s@20480") is None  # another size: not trained
    assert members[-1].val_loss < members[0].val_loss  # more tokens, lower held-out loss


def test_labels_of_kept_members_are_distinct(members: list[LadderMember]) -> None:
    from pipeline.run import ladder_label

    labels = [ladder_label(m.family, m.name, Path(m.path)) for m in members]
    version = config_hash(TOKENS)[:8]
    assert labels == [f"ladder:test-tokens/xs@{t}@{version}" for t in TOKENS.keep_tokens]


def straight_run(keep_steps: int, data_dir: Path) -> dict[str, torch.Tensor]:
    """A plain single run of `keep_steps` steps with the branch's schedule: the reference a branch
    (stable run to the branch point, copied, then cooled down) must reproduce exactly."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from pipeline.ladders.train import build_model, make_optimizer, window_order

    config, size = TOKENS, TOKENS.sizes[0]
    ids = np.load(data_dir / "train_ids.npy")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data_dir / "tokenizer")
    torch.set_num_threads(1)
    model = build_model(config, size, tokenizer)
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    order = window_order(config.steps, config.batch_size, len(ids) // config.seq_len, config.seed)
    floor = config.lr * config.min_lr_ratio
    for step in range(keep_steps):
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(
                step, keep_steps, config.warmup_steps, config.lr, floor, config.cooldown_frac
            )
        rows = order[step * config.batch_size : (step + 1) * config.batch_size]
        starts = rows[:, None] * config.seq_len + np.arange(config.seq_len)[None, :]
        batch = torch.from_numpy(ids[starts].astype(np.int64))
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.state_dict()


@pytest.mark.parametrize("index", [0, 2])
def test_a_branch_equals_a_straight_run_with_its_schedule(members: list[LadderMember], index: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    try:
        expected = straight_run(TOKENS.keep_steps[index], ladder_dir(TOKENS))
    finally:
        torch.set_num_threads(threads)
    kept = AutoModelForCausalLM.from_pretrained(members[index].path).state_dict()
    assert expected.keys() == kept.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, kept[name]), name  # stable state and optimizer moments carried over


def _write_v5(path: Path, rows: list[dict]) -> None:
    """A file as the schema-5 code wrote it: no train_tokens column."""
    schema = pa.schema([SCHEMA.field(name) for name in schema_columns(5)])
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    pq.write_table(
        pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata({SCHEMA_VERSION_KEY: b"5"}), path
    )


def _row(job_key: str, model: str, **extra: object) -> dict:
    job = json.dumps({"model": {"name_or_path": model}, "recipe": {"bits": 4}})
    row = {"job_key": job_key, "study": "s", "model": model, "bits": 4, "task": "heldout", "metric": "ppl",
           "value": 9.0, "status": "ok", "created_at": datetime.now(UTC), "job_json": job}  # fmt: skip
    return row | extra


def test_train_tokens_round_trip_and_fill_old_rows(tmp_path: Path) -> None:
    new = tmp_path / "new"
    write_job_rows(new, "a", [_row("a", "ladder:test-tokens/xs@10240@abcd1234", train_tokens=10_240)])
    write_job_rows(new, "b", [_row("b", "gpt2")])
    frame = load_results(new).set_index("job_key")
    assert frame.loc["a", "train_tokens"] == 10_240 and str(frame["train_tokens"].dtype) == "Int64"
    assert frame["train_tokens"].isna()["b"]
    old = tmp_path / "old"
    old.mkdir()
    test = get_ladder("test")
    rows = [
        _row("c", f"ladder:test/xs@{config_hash(test)[:8]}"),  # a registered ladder as it still is
        _row("d", "ladder:test/xs@00000000"),  # retuned since: its tokens are not knowable
        _row("e", "gpt2"),
    ]
    _write_v5(old / "part.parquet", rows)
    filled = load_results(old).set_index("job_key")["train_tokens"]
    assert filled["c"] == test.tokens and filled.isna()["d"] and filled.isna()["e"]
    v1 = load_results(V1_DIR)  # schema-1 fixtures: members of the tiny ladder as it still is
    assert (v1["model"] == f"ladder:tiny/d16@{config_hash(get_ladder('tiny'))[:8]}").all()
    assert (v1["train_tokens"] == get_ladder("tiny").tokens).all()
