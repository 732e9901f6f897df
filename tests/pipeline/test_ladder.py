"""Model ladders: configs, the tokenizer, training the `test` ladder, caching and resolution."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.ladders import ladder as ladder_module
from pipeline.ladders.configs import LADDERS, LadderConfig, ModelSize, config_hash, get_ladder, smoke_config
from pipeline.ladders.ladder import (
    LadderMember,
    is_ladder_ref,
    ladder_dir,
    main,
    parse_ladder_ref,
    resolve_ladder,
    train_ladder,
)
from pipeline.ladders.train import METADATA_FILE, chunk_text, evaluate_loss, lr_at, window_order

TEST = get_ladder("test")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh KBIT_CACHE for this module."""
    root = tmp_path_factory.mktemp("kbit_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KBIT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def trained(cache: Path, data_root: Path) -> list[LadderMember]:
    """The whole `test` ladder, trained once for this module."""
    return resolve_ladder("ladder:test", data_root)


def test_tokenizer_is_deterministic(data_root: Path) -> None:
    from pipeline.ladders.corpus import split_corpus
    from pipeline.ladders.tokenizer import train_tokenizer

    chunks = chunk_text(split_corpus(data_root)[0], 100_000)
    first, second = train_tokenizer(chunks, 512), train_tokenizer(list(chunks), 512)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()  # vocab and merges
    assert len(first) == 512
    sample = chunks[3][:2000]
    assert first(sample)["input_ids"] == second(sample)["input_ids"]


def test_every_shipped_ladder_is_geometric_and_large_enough() -> None:
    for config in LADDERS.values():
        params = [size.non_embedding_params for size in config.sizes]
        assert len(params) >= 3, config.name
        ratios = np.array(params[1:]) / np.array(params[:-1])
        assert (ratios > 1.5).all() and (ratios < 8).all(), (config.name, params)
    h100 = get_ladder("h100").sizes
    assert len(h100) >= 5
    assert h100[0].non_embedding_params < 1.5e6 and h100[-1].non_embedding_params >= 30e6


def test_bad_configs_and_names_fail_clearly() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        ModelSize("x", 30, 1, 4, 64)
    with pytest.raises(ValueError, match="repeats a size name"):
        dataclasses.replace(TEST, sizes=(TEST.sizes[0], TEST.sizes[0]))
    with pytest.raises(ValueError, match="warmup_steps"):
        dataclasses.replace(TEST, warmup_steps=TEST.steps)
    with pytest.raises(ValueError, match="architecture"):
        dataclasses.replace(TEST, architecture="gpt2")  # type: ignore[arg-type]
    with pytest.raises(
        KeyError, match=r"unknown ladder .*allowed: demo, h100, h100-tokens, test, test-tokens, tiny"
    ):
        get_ladder("huge")
    with pytest.raises(KeyError, match="allowed: xs, s, m"):
        TEST.size("xl")
    assert TEST.size("1") == TEST.size("s") and TEST.size("-1").name == "m"


def test_config_hash_follows_what_shapes_training() -> None:
    assert config_hash(TEST) == config_hash(dataclasses.replace(TEST, log_every=7))
    assert config_hash(TEST) != config_hash(dataclasses.replace(TEST, seed=TEST.seed + 1))
    smoke = smoke_config(get_ladder("h100"), 2)
    assert smoke.steps == 2 and smoke.warmup_steps < 2 and smoke.eval_tokens == smoke.tokens_per_step
    assert config_hash(smoke) != config_hash(get_ladder("h100"))


def test_schedule_and_data_order_are_shared_and_well_formed() -> None:
    rates = [lr_at(step, TEST) for step in range(TEST.steps)]
    assert rates[TEST.warmup_steps - 1] == pytest.approx(TEST.lr)
    assert rates[0] < rates[TEST.warmup_steps // 2] < TEST.lr
    assert rates[-1] == pytest.approx(TEST.lr * TEST.min_lr_ratio, rel=0.05)
    decay = rates[TEST.warmup_steps - 1 :]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lr_at(0, TEST, peak=1.0) == pytest.approx(1.0 / TEST.warmup_steps)
    order = window_order(n_steps=25, batch_size=4, n_windows=30, seed=1)
    assert np.array_equal(order, window_order(25, 4, 30, 1))
    assert sorted(order[:30]) == list(range(30)) and sorted(order[30:60]) == list(range(30))
    assert not np.array_equal(order[:30], order[30:60])


def test_ladder_ref_parsing() -> None:
    assert is_ladder_ref("ladder:tiny") and is_ladder_ref("ladder:tiny/d64")
    assert not is_ladder_ref("EleutherAI/pythia-70m") and not is_ladder_ref("/models/ladder:x")
    assert parse_ladder_ref("ladder:test") == (TEST, TEST.sizes)
    assert parse_ladder_ref("ladder:test/0") == (TEST, (TEST.sizes[0],))
    with pytest.raises(KeyError, match="unknown ladder"):
        parse_ladder_ref("ladder:nope")
    with pytest.raises(KeyError, match="allowed: xs, s, m"):
        parse_ladder_ref("ladder:test/")
    with pytest.raises(ValueError, match="not a ladder reference"):
        parse_ladder_ref("gpt2")


def test_test_ladder_trains_loadable_checkpoints_with_loss_falling_with_size(
    trained: list[LadderMember], cache: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert [m.size_name for m in trained] == ["xs", "s", "m"]
    assert all(Path(m.path).parent == ladder_dir(TEST, cache) for m in trained)
    losses = [m.val_loss for m in trained]
    assert losses[0] > losses[1] > losses[2], losses
    heldout = np.load(ladder_dir(TEST, cache) / "heldout_ids.npy")
    for member, size in zip(trained, TEST.sizes, strict=True):
        model = AutoModelForCausalLM.from_pretrained(member.path)
        tokenizer = AutoTokenizer.from_pretrained(member.path)
        assert len(tokenizer) == TEST.vocab_size == model.config.vocab_size
        assert member.n_params == sum(p.numel() for p in model.parameters())
        assert member.non_embedding_params == size.non_embedding_params
        assert member.tokens_seen == TEST.steps * TEST.batch_size * TEST.seq_len
        assert evaluate_loss(model, heldout, TEST)[0] == pytest.approx(member.val_loss, abs=1e-4)


def test_a_trained_ladder_is_reused_not_retrained(
    trained: list[LadderMember], data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mtimes = [(Path(m.path) / "model.safetensors").stat().st_mtime_ns for m in trained]

    def refuse(*args: object) -> None:
        raise AssertionError("a cached member was retrained")

    monkeypatch.setattr(ladder_module, "train_member", refuse)
    assert resolve_ladder("ladder:test", data_root) == trained
    assert resolve_ladder("ladder:test/s", data_root) == [trained[1]]
    assert resolve_ladder("ladder:test/2", data_root) == [trained[2]]
    assert [(Path(m.path) / "model.safetensors").stat().st_mtime_ns for m in trained] == mtimes


def test_cli_lists_and_prints_the_cached_ladder(
    trained: list[LadderMember], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--list"]) == 0
    assert "h100:" in capsys.readouterr().out
    assert main(["test"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(TEST.sizes) and all(m.path in "".join(lines) for m in trained)


def test_a_crash_leaves_no_half_member(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config: LadderConfig = dataclasses.replace(TEST, sizes=TEST.sizes[:1], steps=4, warmup_steps=1)
    real_train_member = ladder_module.train_member

    def crash(config: LadderConfig, size: ModelSize, data: object, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(ladder_module, "train_member", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train_ladder(config, data_root, cache=tmp_path)
    folder = ladder_dir(config, tmp_path)
    assert not (folder / "xs").exists() and (folder / "train_ids.npy").is_file()
    monkeypatch.setattr(ladder_module, "train_member", real_train_member)
    (member,) = train_ladder(config, data_root, cache=tmp_path)
    assert (Path(member.path) / METADATA_FILE).is_file()
    assert not list(folder.glob(".tmp-*"))


def test_a_member_folder_without_metadata_is_retrained(tmp_path: Path, data_root: Path) -> None:
    """A copy that lost files (a partial sync, a disk cleaner) is replaced, not a crash."""
    config: LadderConfig = dataclasses.replace(TEST, sizes=TEST.sizes[:1], steps=4, warmup_steps=1)
    (member,) = train_ladder(config, data_root, cache=tmp_path)
    (Path(member.path) / METADATA_FILE).unlink()
    (again,) = train_ladder(config, data_root, cache=tmp_path)
    assert again.path == member.path and (Path(again.path) / METADATA_FILE).is_file()


def test_dry_run_counts_a_cached_ladder_per_size(trained: list[LadderMember], tmp_path: Path) -> None:
    from pipeline.ladders.ladder import cached_ladder
    from pipeline.run import plan_run

    assert cached_ladder("ladder:test") == trained and cached_ladder("ladder:test/1") == [trained[1]]
    plan = plan_run(
        [
            "model.name_or_path=ladder:test",
            "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,context_length:64,stride:64}]",
            "quant.bits=3,4",
            "dry_run=true",
            f"results_root={tmp_path}",
        ]
    )
    assert len(plan.jobs) == 2 * len(trained)
    assert {job.model.name_or_path for job in plan.jobs} == {m.path for m in trained}


def test_ladder_jobs_keep_their_keys_in_another_cache(
    trained: list[LadderMember], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys name a member by its label (ladder, size, config hash), not the folder it loads from."""
    import shutil

    from pipeline.run import plan_run

    argv = [
        "model.name_or_path=ladder:test",
        "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,context_length:64,stride:64}]",
        "quant.bits=4",
        "dry_run=true",
        f"results_root={tmp_path / 'results'}",
    ]
    here = plan_run(argv)
    shutil.copytree(cache, tmp_path / "moved")
    monkeypatch.setenv("KBIT_CACHE", str(tmp_path / "moved"))
    there = plan_run(argv)
    assert {j.model.name_or_path for j in here.jobs}.isdisjoint({j.model.name_or_path for j in there.jobs})
    assert [j.key for j in here.jobs] == [j.key for j in there.jobs] and len(here.jobs) == len(trained)
    assert all(j.model_label in j.job_json and j.model.name_or_path not in j.job_json for j in here.jobs)


def test_tuning_runs_are_cached_beside_the_registered_ladder(tmp_path: Path, data_root: Path) -> None:
    from pipeline.ladders.configs import tuning_config

    base = dataclasses.replace(TEST, sizes=TEST.sizes[:1], steps=4, warmup_steps=1)
    tuned = tuning_config(base, lr=1e-3, steps=6)
    assert (tuned.lr, tuned.steps, tuned.warmup_steps, tuned.sizes[0].lr) == (1e-3, 6, 0, None)
    assert ladder_dir(tuned, tmp_path) != ladder_dir(base, tmp_path)
    (member,) = train_ladder(tuned, data_root, cache=tmp_path)
    assert member.tokens_seen == 6 * TEST.batch_size * TEST.seq_len
    assert not ladder_dir(base, tmp_path).exists()
    with pytest.raises(ValueError, match="steps"):
        tuning_config(base, steps=0)


def _train_sizes(config: LadderConfig, data_root: Path, cache: Path, names: list[str]) -> list[str]:
    return [m.path for m in train_ladder(config, data_root, [config.size(n) for n in names], cache=cache)]


def test_processes_given_different_sizes_train_them_side_by_side(tmp_path: Path, data_root: Path) -> None:
    """One process per GPU, each with its own sizes: the data is prepared once, every member trained once."""
    import concurrent.futures
    import multiprocessing

    config: LadderConfig = dataclasses.replace(TEST, steps=4, warmup_steps=1)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        first = pool.submit(_train_sizes, config, data_root, tmp_path, ["xs", "m"])
        second = pool.submit(_train_sizes, config, data_root, tmp_path, ["s"])
        paths = first.result(timeout=300) + second.result(timeout=300)
    folder = ladder_dir(config, tmp_path)
    assert sorted(Path(p).name for p in paths) == ["m", "s", "xs"]
    assert all((Path(p) / METADATA_FILE).is_file() for p in paths)
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob(".*.tmp"))
    members = train_ladder(config, data_root, cache=tmp_path)  # all cached now: nothing retrains
    assert [m.path for m in members] == [str(folder / n) for n in ("xs", "s", "m")]


def test_seeds_suffix_names_reseeded_twins() -> None:
    assert ladder_module.split_seeds("ladder:test") == ("ladder:test", 1)
    assert ladder_module.split_seeds("ladder:test/xs+seeds3") == ("ladder:test/xs", 3)
    for bad in ("ladder:test+seeds0", "ladder:test+seeds", "ladder:test+seedsx"):
        with pytest.raises(ValueError, match=r"\+seeds<N> with N >= 1|'\+seeds<N>' with N >= 1"):
            parse_ladder_ref(bad)
    seeded = ladder_module.parse_seeded_ref("ladder:test/xs+seeds3")
    assert [config.seed for config, _ in seeded] == [TEST.seed, TEST.seed + 1, TEST.seed + 2]
    assert seeded[0][0] == TEST and all(sizes == (TEST.sizes[0],) for _, sizes in seeded)
    assert len({config_hash(config) for config, _ in seeded}) == 3  # one cache folder per seed


def test_seeds_are_trained_apart_and_the_first_is_the_plain_member(
    trained: list[LadderMember], cache: Path, data_root: Path
) -> None:
    first, second = resolve_ladder("ladder:test/xs+seeds2", data_root)
    assert first.path == trained[0].path  # seed 0 is the plain ladder's member, not retrained
    assert second.path != first.path and second.n_params == first.n_params
    assert second.val_loss != first.val_loss  # another initialization and data order
    assert ladder_module.cached_ladder("ladder:test/xs+seeds2") == [first, second]
    assert ladder_module.cached_ladder("ladder:test/xs+seeds3") is None  # the third is not trained
