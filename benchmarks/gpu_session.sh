#!/usr/bin/env bash
# The GPU runs of issues 6 and 7, one device call per phase, as run on a lent 2 x H200 machine.
#
#   bash benchmarks/gpu_session.sh study    # train the h100 ladder on GPU 0 while GPU 1 runs
#                                           # benchmarks/evaluation.py; then the paper grid on GPU 0
#   bash benchmarks/gpu_session.sh resume   # the paper grid on every GPU (resumes: done jobs are skipped)
#   bash benchmarks/gpu_session.sh final    # what ran last: issue 7's scaling run, then the grid scored by
#                                           # WikiText-2 alone, with a worker killed mid-sweep (see below)
#   bash benchmarks/gpu_session.sh after    # the calls that followed 'final' on the same warm machine:
#                                           # finish the grid, per-job overhead, the 1-vs-2-GPU pair again
# Second session (the re-tuned ladder; four calls, 27 of the 30 device minutes):
#   bash benchmarks/gpu_session.sh tune     # evaluation benchmark (packed FastScorer) + lr sweep at 600 steps
#   GRID_EVAL=paper_ppl STUDY=paper-ppl bash benchmarks/gpu_session.sh retuned   # ladder split over 2 GPUs,
#                                           # then the paper grid on WikiText-2
#   GRID_EVAL=paper_ladder SCORER=fast STUDY=paper-zeroshot bash benchmarks/gpu_session.sh retuned
#                                           # (the next call, on the still-warm machine: same ladder)
#   bash benchmarks/gpu_session.sh heldout  # GPU tests, evaluation benchmark (fused path), ladder again,
#                                           # the paper grid on the ladder's held-out corpus
# Third session (one H200):
#   EAGER=1 bash benchmarks/gpu_session.sh compile    # GPU tests, evaluation benchmark compiled and eager
#   PROFILE=1 bash benchmarks/gpu_session.sh compile  # forward profile, evaluation benchmark (compiled)
#   bash benchmarks/gpu_session.sh compile            # GPU tests, evaluation benchmark (compiled, profiled)
# Fourth session (one H200, GPTQ):
#   bash benchmarks/gpu_session.sh gptq        # GPU tests, benchmarks/gptq.py at the 410M and 1.4B shapes
#   bash benchmarks/gpu_session.sh gptq-study  # h100 ladder (three processes on the one GPU), sweeps/gptq.yaml
# Eighth session's work, measured by the next one: BUDGET=560 bash benchmarks/gpu_session.sh pending
# Fifth session (one H200):
#   bash benchmarks/gpu_session.sh gptq-1.4b   # benchmarks/gptq.py at the 1.4B shape, quantile included
#   bash benchmarks/gpu_session.sh paired      # h100 ladder, then the paper grid on the held-out split with
#                                              # per-chunk units and KL to 16-bit (issue 15)
#
# Needs (see ../shared/device/README.md): .whl/site.tar.xz (Ray, Hydra, lm-eval) and .carry/data (a copy
# of ../shared/data), both carried. Everything stops by $BUDGET seconds (default 550) so that a 600 s
# call returns its files: logs, benchmark JSON and a tarball of results/<study>/ under $OUT. Rows are
# written per job, atomically, so a sweep cut at the deadline resumes where it stopped.
set -uo pipefail
phase=${1:?usage: gpu_session.sh study|resume|final|after|tune|retuned|heldout|compile}
start=$SECONDS
budget=${BUDGET:-550}
OUT=${OUT:-/tmp/kbit-out}
mkdir -p "$OUT" /tmp/site
left() { echo $((budget - (SECONDS - start))); }

if [ -z "${NO_SITE:-}" ] && [ ! -d /tmp/site/ray ]; then tar xJf .whl/site.tar.xz -C /tmp/site || exit 1; fi  # NO_SITE=1: a local venv
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export KBIT_DATA_ROOT=.carry/data KBIT_CACHE=/tmp/kcache  # outside the synced tree
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, ray, lm_eval; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'ray', ray.__version__, 'lm_eval', lm_eval.__version__)"

LADDER=${LADDER:-h100} EVAL=${EVAL:-paper_ladder}  # LADDER=tiny EVAL=smoke: a CPU dry run of this script
STUDY_ARGS=(-m +sweep=paper model=ladder/$LADDER eval=$EVAL eval.data_root=.carry/data)
# Issue 7's 192-job grid (WikiText-2 only, two workers per GPU), run on 1 GPU and on every GPU
EV=(eval=${EVAL_PPL:-paper_ppl} eval.data_root=.carry/data ray.workers_per_gpu=2)
SCALE_GRID=(-m model=ladder/$LADDER "${EV[@]}" quant.dtype=int,fp,nf,quantile quant.bits=3,4,5,6 quant.block_size=64,1024)
quiet() { grep --line-buffered -v -E "it/s\]|s/it\]|^\s*$"; }

train_ladder() {  # no-op when the ladder is already in $KBIT_CACHE
  local t=$SECONDS
  CUDA_VISIBLE_DEVICES=${1:-0} python3 -m pipeline.ladders.ladder "$LADDER" 2>&1 | tee -a "$OUT/ladder.log" | tail -8
  echo "ladder: $((SECONDS - t)) s"
}

sweep() {  # sweep <seconds> <overrides...>: the paper grid until done or the deadline
  local seconds=$1; shift
  echo "sweep for at most ${seconds}s: $*"
  timeout --signal=INT --kill-after=20 "$seconds" python3 -m pipeline.run "$@" 2>&1 | quiet >>"$OUT/sweep.log"
  echo "sweep exit ${PIPESTATUS[0]}"; tail -4 "$OUT/sweep.log"
}

pack_results() {  # results/<study> -> $OUT/results-<study>.tar.gz (every row, even of a cut sweep)
  [ -d "results/$1" ] && tar czf "$OUT/results-$1.tar.gz" "results/$1" && ls -la "$OUT/results-$1.tar.gz"
}

collect_members() {  # every trained member's metadata (config, val loss) -> $OUT/members.tar.gz
  (cd "$KBIT_CACHE" 2>/dev/null && find . -name "*.json" -size -64k | tar czf "$OUT/members.tar.gz" -T -) \
    && ls -la "$OUT/members.tar.gz"
}

case $phase in
study)
  CUDA_VISIBLE_DEVICES=1 timeout $(($(left) - 15)) python3 benchmarks/evaluation.py --shape pythia-410m \
    --device cuda --limit 500 --configs 5 --naive-configs 3 --batch-size 64 --data-root .carry/data \
    --out "$OUT/evaluation-h200.json" >"$OUT/evaluation.log" 2>&1 &
  bench=$!
  train_ladder 0
  CUDA_VISIBLE_DEVICES=0 sweep $(($(left) - 25)) "${STUDY_ARGS[@]}" ray.workers_per_gpu=3
  wait $bench; echo "evaluation benchmark exit $?"
  pack_results paper
  tail -60 "$OUT/evaluation.log"
  ;;
resume)
  train_ladder 0
  sweep $(($(left) - 20)) "${STUDY_ARGS[@]}" ray.workers_per_gpu=3
  pack_results paper
  ;;
final)
  # The plan that fits one call once the study measured ~2.6 s of lm-eval work per zero-shot job:
  # WikiText-2 only (eval=paper_ppl). Issue 7 first: a 192-job grid on 1 GPU (study scale-1), then on
  # every GPU into study paper-ppl; then the whole paper grid into paper-ppl (the 192 done jobs are
  # skipped) with one ModelWorker killed 30 s in; then checks, and the dispatch benchmark if time is left.
  train_ladder 0
  t=$SECONDS; sweep $((($(left) - 100) / 3)) "${SCALE_GRID[@]}" study=scale-1 ray.num_gpus=1; w1=$((SECONDS - t))
  t=$SECONDS; sweep $((($(left) - 100) / 2)) "${SCALE_GRID[@]}" study=paper-ppl; wn=$((SECONDS - t))
  echo "walls: 1 GPU ${w1} s, all GPUs ${wn} s" | tee -a "$OUT/scale.txt"
  python3 benchmarks/scaling_check.py --one results/scale-1 --many results/paper-ppl --wall-one $w1 \
    --wall-many $wn --out "$OUT/scaling.json" 2>&1 | tee -a "$OUT/scale.txt"
  planned=$(python3 -m pipeline.run "${STUDY_ARGS[@]:0:3}" "${EV[@]}" study=paper-ppl dry_run=true 2>/dev/null \
    | sed -n 's/^\([0-9]*\) cells -> \([0-9]*\) jobs.*/\2/p')  # the ladder is cached: counted per size
  (sleep 30; pid=$(pgrep -f "ray::ModelWorker" | head -1); echo "killing ModelWorker pid $pid" \
    | tee -a "$OUT/scale.txt"; kill -9 "$pid") &
  sweep $(($(left) - 40)) "${STUDY_ARGS[@]:0:3}" "${EV[@]}" study=paper-ppl
  grep -E "retried|finished|interrupted" "$OUT/sweep.log" | tail -3 | tee -a "$OUT/scale.txt"
  python3 benchmarks/scaling_check.py --kill results/paper-ppl --kill-jobs "${planned:-0}" \
    --out "$OUT/kill.json" 2>&1 | tee -a "$OUT/scale.txt"
  tar czf "$OUT/results.tar.gz" results/scale-1 results/paper-ppl && ls -la "$OUT/results.tar.gz"
  [ "$(left)" -gt 45 ] && CUDA_VISIBLE_DEVICES=0 timeout $(($(left) - 5)) python3 benchmarks/dispatch.py \
    --part overhead --device cuda --jobs 12 --out "$OUT/dispatch-overhead-h200.json" 2>&1 | tail -25
  ;;
after)
  sweep $(($(left) - 400)) "${STUDY_ARGS[@]:0:3}" "${EV[@]}" study=paper-ppl
  python3 benchmarks/scaling_check.py --kill results/paper-ppl --kill-jobs 1206 --out "$OUT/kill-final.json"
  tar czf "$OUT/results-final.tar.gz" results/paper-ppl
  mkdir -p ../shared && ln -sfn "$PWD/.carry/data" ../shared/data  # dispatch.py reads ../shared/data
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/dispatch.py --part overhead --device cuda --jobs 12 \
    --out "$OUT/dispatch-overhead-h200.json" 2>&1 | tail -16
  t=$SECONDS; sweep 160 "${SCALE_GRID[@]}" study=s1 ray.num_gpus=1; w1=$((SECONDS - t))
  t=$SECONDS; sweep 120 "${SCALE_GRID[@]}" study=s2; w2=$((SECONDS - t))
  python3 benchmarks/scaling_check.py --one results/s1 --many results/s2 --wall-one $w1 --wall-many $w2 \
    --out "$OUT/scaling2.json"
  tar czf "$OUT/scale2.tar.gz" results/s1 results/s2
  ;;
tune)
  # Session 2, call 1. GPU 1: the evaluation benchmark with the packed FastScorer (batch 256); then a
  # ladder at lr 4e-3. GPU 0: the ladder at lr 2e-3 and 3e-3 at once (small models leave the GPU idle).
  CUDA_VISIBLE_DEVICES=1 timeout 330 python3 benchmarks/evaluation.py --shape pythia-410m --device cuda \
    --limit 500 --configs 5 --naive-configs 3 --batch-size ${EVAL_BATCH:-256} --data-root .carry/data \
    --out "$OUT/evaluation-h200-packed.json" >"$OUT/evaluation.log" 2>&1 &
  bench=$!
  for lr in ${LRS:-2e-3 3e-3}; do
    CUDA_VISIBLE_DEVICES=0 timeout $(($(left) - 30)) python3 -m pipeline.ladders.ladder "$LADDER" --lr "$lr" \
      >"$OUT/ladder-lr$lr.log" 2>&1 &
  done
  wait $bench; echo "evaluation benchmark exit $?"; tail -30 "$OUT/evaluation.log"
  CUDA_VISIBLE_DEVICES=1 timeout $(($(left) - 30)) python3 -m pipeline.ladders.ladder "$LADDER" --lr ${LR_LATE:-4e-3} \
    >"$OUT/ladder-lr${LR_LATE:-4e-3}.log" 2>&1 &
  wait
  collect_members
  ;;
retuned)
  # Session 2, calls 2 and 3: the re-tuned ladder (1,200 steps at 2e-3), its sizes split over two GPUs
  # (each member trains under its own lock), then the paper grid on both GPUs. Call 2: GRID_EVAL=paper_ppl
  # STUDY=paper-ppl; call 3: GRID_EVAL=paper_ladder SCORER=fast STUDY=paper-zeroshot (it ran on the
  # still-warm machine, whose cache kept the ladder: the same trained models as call 2; on a fresh
  # machine it retrains, and every row of a study still comes from one training of each size).
  t=$SECONDS
  CUDA_VISIBLE_DEVICES=0 python3 -m pipeline.ladders.ladder "$LADDER" ${SIZES_GPU0:---size d512 --size d384} \
    >"$OUT/ladder-gpu0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 python3 -m pipeline.ladders.ladder "$LADDER" \
    ${SIZES_GPU1:---size d320 --size d256 --size d192 --size d128} >"$OUT/ladder-gpu1.log" 2>&1 &
  wait; echo "ladder: $((SECONDS - t)) s"; grep -h "validation loss" "$OUT"/ladder-gpu*.log; collect_members
  sweep $(($(left) - 25)) -m +sweep=paper model=ladder/$LADDER eval=${GRID_EVAL:-paper_ppl} \
    eval.data_root=.carry/data eval.scorer=${SCORER:-hflm} ray.workers_per_gpu=${WORKERS:-2} \
    study=${STUDY:-paper-ppl}
  pack_results "${STUDY:-paper-ppl}"
  ;;
heldout)
  # Session 2, call 4. GPU 1: the GPU tests of the new code, then the evaluation benchmark (packed
  # FastScorer, token batches, fused log-prob kernel, no per-matrix sync in quantize; naive baseline in
  # the same run), then three ladder sizes; GPU 0: the other three. Then the paper grid scored on the
  # ladder's own held-out corpus (eval=heldout_ppl) on both GPUs.
  ( CUDA_VISIBLE_DEVICES=1 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_logprobs.py \
      tests/pipeline/test_fastscore.py tests/pipeline/test_models.py 2>&1 | tail -4
    CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/evaluation.py --shape pythia-410m --device cuda \
      --limit 500 --configs 5 --naive-configs 2 --batch-size 256 --scorers fast --data-root .carry/data \
      --out "$OUT/evaluation-h200-fused.json" >"$OUT/evaluation.log" 2>&1; echo "benchmark exit $?"
    CUDA_VISIBLE_DEVICES=1 python3 -m pipeline.ladders.ladder "$LADDER" --size d320 --size d256 --size d192 \
      >"$OUT/ladder-gpu1.log" 2>&1 ) &
  CUDA_VISIBLE_DEVICES=0 python3 -m pipeline.ladders.ladder "$LADDER" --size d512 --size d384 --size d128 \
    >"$OUT/ladder-gpu0.log" 2>&1
  wait; tail -12 "$OUT/evaluation.log"; grep -h "validation loss" "$OUT"/ladder-gpu*.log; collect_members
  sweep $(($(left) - 20)) -m +sweep=paper model=ladder/$LADDER eval=heldout_ppl eval.data_root=.carry/data \
    ray.workers_per_gpu=2 study=paper-heldout
  pack_results paper-heldout
  ;;
compile)
  # Session 3 (one H200). Call 1 (EAGER=1): the GPU tests, then the evaluation benchmark with the decoder
  # blocks compiled every size dynamic (naive baseline in the same run) and eager. Call 3 (PROFILE=1):
  # the forward profile (eager, compiled three ways), then the benchmark as compile_layers does it now.
  # Last call (neither): the GPU tests, then the benchmark with its forwards-alone pairs and one job
  # under the profiler.
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
  [ -n "${PROFILE:-}" ] || python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_logprobs.py \
    tests/pipeline/test_fastscore.py tests/pipeline/test_models.py tests/pipeline/test_evaluate.py 2>&1 | tail -4
  bench() {  # bench <name> <timeout> <args...>
    local name=$1 seconds=$2; shift 2
    timeout "$seconds" python3 benchmarks/evaluation.py --shape pythia-410m --device cuda --limit 500 \
      --configs 5 --batch-size 256 --scorers fast --data-root .carry/data --out "$OUT/evaluation-h200-$name.json" \
      "$@" >"$OUT/evaluation-$name.log" 2>&1; echo "benchmark $name exit $?"; tail -11 "$OUT/evaluation-$name.log"
  }
  if [ -n "${EAGER:-}" ]; then
    bench compiled $(($(left) - 100)) --compile on --naive-configs 2
    bench eager $(($(left) - 5)) --compile off --naive none
  elif [ -n "${PROFILE:-}" ]; then
    python3 benchmarks/forward_profile.py --device cuda --out "$OUT/forward-profile-h200.json" 2>&1 \
      | grep -v -i warn | grep -A40 "^NVIDIA"
    bench compiled $(($(left) - 5)) --compile on --naive-configs 2
  else
    bench compiled $(($(left) - 5)) --compile on --naive-configs 2 --profile-job
  fi
  ;;
gptq)
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/pipeline/test_models.py \
    tests/pipeline/test_fastscore.py 2>&1 | tail -3
  for shape in pythia-410m pythia-1.4b; do
    timeout $(($(left) - 10)) python3 benchmarks/gptq.py --shape $shape --device cuda --data-root .carry/data \
      --out "$OUT/gptq-h200-$shape.json" >"$OUT/gptq-$shape.log" 2>&1
    echo "gptq $shape exit $?"; grep -v -i -E "warn|it/s" "$OUT/gptq-$shape.log" | tail -14
  done
  ;;
gptq-study)
  # the ladder: processes share the GPU (per-member locks), SIZES in groups (default: all six, in three
  # processes balanced by size), then sweeps/gptq.yaml on those sizes; BENCH=1: then the 1.4B benchmark
  t=$SECONDS
  for group in ${SIZE_GROUPS:-"d128,d512" "d192,d384" "d256,d320"}; do
    (for size in ${group//,/ }; do python3 -m pipeline.ladders "$LADDER" --size "$size" >>"$OUT/ladder.log" 2>&1; done) &
  done
  wait; echo "ladder: $((SECONDS - t)) s"
  members=$(echo ${SIZE_GROUPS:-d128,d512,d192,d384,d256,d320} | tr ' ' ',')
  sweep $(($(left) - ${RESERVE:-40})) -m +sweep=gptq "model.name_or_path=$(for s in ${members//,/ }; do printf 'ladder:%s/%s,' "$LADDER" "$s"; done | sed 's/,$//')" \
    eval.data_root=.carry/data ray.workers_per_gpu=4 report=true
  pack_results gptq; collect_members
  if [ -n "${BENCH:-}" ]; then
    timeout $(($(left) - 5)) python3 benchmarks/gptq.py --shape pythia-1.4b --device cuda --data-root .carry/data \
      --dtypes int,nf,fp --jobs 2 --out "$OUT/gptq-h200-pythia-1.4b.json" >"$OUT/gptq-1.4b.log" 2>&1
    echo "gptq 1.4b exit $?"; grep -v -i -E "warn|it/s" "$OUT/gptq-1.4b.log" | tail -14
  fi
  ;;
paired)
  # fifth session: issue 15's re-run: the h100 ladder (three processes on the one GPU), then the paper
  # grid on the held-out split with per-chunk units and KL to 16-bit (eval=heldout_ppl), eager
  t=$SECONDS
  for group in "d128,d512" "d192,d384" "d256,d320"; do
    (for size in ${group//,/ }; do python3 -m pipeline.ladders "$LADDER" --size "$size" >>"$OUT/ladder.log" 2>&1; done) &
  done
  wait; echo "ladder: $((SECONDS - t)) s"; grep -h "validation loss" "$OUT/ladder.log"; collect_members
  sweep $(($(left) - 25)) -m +sweep=paper model=ladder/$LADDER eval=heldout_ppl eval.data_root=.carry/data \
    eval.compile=false ray.workers_per_gpu=4 study=${STUDY:-h100-ladder-heldout-paired}
  pack_results ${STUDY:-h100-ladder-heldout-paired}
  ;;
gptq-1.4b)
  # fifth session: the 1.4B shape alone in its own call (building it took most of a shared call before)
  timeout $(($(left) - 10)) python3 benchmarks/gptq.py --shape pythia-1.4b --device cuda --data-root .carry/data \
    --dtypes ${DTYPES:-int,nf,fp,quantile} --jobs 2 --out "$OUT/gptq-h200-pythia-1.4b.json" >"$OUT/gptq-1.4b.log" 2>&1
  echo "gptq 1.4b exit $?"; grep -v -i -E "warn|it/s" "$OUT/gptq-1.4b.log" | tail -30
  ;;
shiftadd)
  # sixth session: issue 18's study: the h100 ladder (three processes on the one GPU), then
  # sweeps/shiftadd.yaml (bcq and shiftadd against rtn and gptq with int and nf at 2-4 bits)
  t=$SECONDS
  for group in "d128,d512" "d192,d384" "d256,d320"; do
    (for size in ${group//,/ }; do python3 -m pipeline.ladders "$LADDER" --size "$size" >>"$OUT/ladder.log" 2>&1; done) &
  done
  wait; echo "ladder: $((SECONDS - t)) s"; grep -h "validation loss" "$OUT/ladder.log"; collect_members
  sweep $(($(left) - 30)) -m +sweep=shiftadd eval.data_root=.carry/data ray.workers_per_gpu=4
  pack_results shiftadd
  ;;
tokens)
  # sixth session: issue 21's study: the h100-tokens ladder (wsd, six kept token counts a size; one process a
  # size on the one GPU), then sweeps/tokens.yaml on every kept member
  t=$SECONDS
  for size in d128 d192 d256 d320; do
    python3 -m pipeline.ladders h100-tokens --size "$size" >>"$OUT/ladder.log" 2>&1 &
  done
  wait; echo "ladder: $((SECONDS - t)) s"; grep -h "validation loss" "$OUT/ladder.log"; collect_members
  sweep $(($(left) - 30)) -m +sweep=tokens eval.data_root=.carry/data ray.workers_per_gpu=4
  pack_results tokens
  ;;
methods-bench)
  # seventh session: issues 19 and 22's speed at the 410M shape (mixed allocation, recovery training)
  timeout $(($(left) / 2)) python3 benchmarks/allocation.py --shape pythia-410m --device cuda --data-root .carry/data \
    --out "$OUT/allocation-h200-pythia-410m.json" >"$OUT/allocation.log" 2>&1
  echo "allocation exit $?"; grep -v -i -E "warn|it/s\]" "$OUT/allocation.log" | tail -22
  timeout $(($(left) - 10)) python3 benchmarks/recovery.py --shape pythia-410m --device cuda --data-root .carry/data \
    --out "$OUT/recovery-h200-pythia-410m.json" >"$OUT/recovery.log" 2>&1
  echo "recovery exit $?"; grep -v -i -E "warn|it/s\]" "$OUT/recovery.log" | tail -12
  ;;
bigmodel)
  # seventh session: issue 20's proof: a random-weight 30B Llama on one H200, snapshot in pinned host memory
  timeout $(($(left) - 10)) python3 benchmarks/bigmodel.py --device cuda --shape llama-30b --tmp /tmp/bigckpt \
    --out "$OUT/bigmodel-h200.json" >"$OUT/bigmodel.log" 2>&1
  echo "bigmodel exit $?"; grep -v -i -E "warn|it/s\]" "$OUT/bigmodel.log" | tail -30
  ;;
recovery)
  # seventh session: finish issue 22's study (done jobs are skipped; int8 points added) on the h100 ladder's
  # four smallest sizes (one process a size), then BCQ's benchmark (issue 18) if BCQ=1
  t=$SECONDS
  for size in d128 d192 d256 d320; do python3 -m pipeline.ladders "$LADDER" --size "$size" >>"$OUT/ladder.log" 2>&1 & done
  wait; echo "ladder: $((SECONDS - t)) s"
  sweep $(($(left) - ${RESERVE:-30})) -m +sweep=recovery \
    "model.name_or_path=ladder:$LADDER/d128,ladder:$LADDER/d192,ladder:$LADDER/d256,ladder:$LADDER/d320" \
    eval.data_root=.carry/data ray.workers_per_gpu=4
  pack_results recovery
  if [ -n "${BCQ:-}" ]; then
    timeout $(($(left) - 5)) python3 benchmarks/bcq.py --device cuda --out "$OUT/bcq-h200-pythia-410m.json" \
      >"$OUT/bcq.log" 2>&1
    echo "bcq exit $?"; grep -v -i -E "warn|it/s\]" "$OUT/bcq.log" | tail -24
  fi
  ;;
pending|startup)
  # pending (eighth session's GPU work, run by the ninth, ~6 min): the GPU tests of the kernels (fused
  # quantizer, BCQ kernel), the fused quantizer old vs new (issue 17, item 6), the BCQ kernel against the
  # torch loop and RTN (issue 18), and the 1.4B start-up sweep cold and warm (issue 17, items 2-3).
  # startup (ninth session, ~5 min): the same without BCQ, the kernels timed by CUDA-graph replay under
  # more launch choices, the start-up with the driver's phases.
  # ONLY_STARTUP=1: the start-up sweep (and the pre-flight profile) alone
  [ -n "${ONLY_STARTUP:-}" ] || python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/pipeline/test_memplan.py 2>&1 | tail -4
  [ "$phase" = startup ] && CHOICES=${CHOICES:-bucket6,bucket4,w8} || CHOICES=chain4,vpt32
  [ -n "${ONLY_STARTUP:-}" ] || { timeout 150 python3 benchmarks/quantize_kernels.py --quick --choices $CHOICES \
    --out "$OUT/kernels-h200.json" >"$OUT/kernels.log" 2>&1; echo "kernels exit $?"; tail -12 "$OUT/kernels.log"; }
  if [ "$phase" = pending ]; then
    timeout 150 python3 benchmarks/bcq.py --device cuda --data-root .carry/data --out "$OUT/bcq-h200-pythia-410m.json" \
      >"$OUT/bcq.log" 2>&1; echo "bcq exit $?"; grep -v -i -E "warn|it/s\]" "$OUT/bcq.log" | tail -24
  fi
  # the driver's pre-flight on this host, cold then warm (benchmarks/preflight_profile.py), on a tiny model
  python3 -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from benchmarks.evaluation import build_model
build_model('tiny', Path('/tmp/prof/model'), 'cuda', Path('.carry/data'))" >/dev/null 2>&1
  for run in cold warm; do
    KBIT_CACHE=/tmp/prof/cache timeout 60 python3 benchmarks/preflight_profile.py --out "$OUT/preflight-$run.json" -- \
      -m model.name_or_path=/tmp/prof/model eval=paper_ladder eval.data_root=.carry/data quant.dtype=int quant.bits=3 \
      >"$OUT/preflight-$run.log" 2>&1; grep -v INFO "$OUT/preflight-$run.log" | head -12
  done
  SHAPE=${SHAPE:-pythia-1.4b}
  timeout $(($(left) - 5)) python3 benchmarks/startup.py --shape $SHAPE --data-root .carry/data \
    --out "$OUT/startup-h200-$SHAPE.json" >"$OUT/startup.log" 2>&1; echo "startup exit $?"; tail -24 "$OUT/startup.log"
  ;;
tenth)
  # tenth session (~7 min): the kernels' GPU tests and the new launch choices at 3/4/6/8 bits, then the
  # start-up with Ray started on the CLI's first line and with kept workers (`RUNS`, in order on one
  # cache: kept-1 cold on a `ray start --head` cluster, warm on an embedded one, kept-2 finds kept-1's
  # worker). ONLY_STARTUP=1: the start-up alone
  if [ -z "${ONLY_STARTUP:-}" ]; then
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_gpu.py 2>&1 | tail -4
    timeout 120 python3 benchmarks/quantize_kernels.py --quick --bits 3,4,6,8 \
      --choices ${CHOICES:-first,ind,ind+first,persist,ind+persist} --out "$OUT/kernels-h200.json" >"$OUT/kernels.log" 2>&1
    echo "kernels exit $?"; tail -12 "$OUT/kernels.log"
  fi
  SHAPE=${SHAPE:-pythia-1.4b}
  timeout $(($(left) - 5)) python3 benchmarks/startup.py --shape $SHAPE --data-root .carry/data \
    --runs ${RUNS:-kept-1,warm,kept-2} --timeout 120 --out "$OUT/startup-h200-$SHAPE.json" 2>&1 \
    | grep -v -i -E "warn|it/s\]" >"$OUT/startup.log"; echo "startup exit ${PIPESTATUS[0]}"; tail -32 "$OUT/startup.log"
  ;;
profile)
  # tenth session (~2 min): where a worker's start goes on this host (benchmarks/worker_profile.py), twice on
  # a 1.4B-shape model: the first pays this bare machine's bytecode compiles, the second is the warm one
  SHAPE=${SHAPE:-pythia-1.4b}
  python3 -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from benchmarks.evaluation import build_model
build_model('$SHAPE', Path('/tmp/prof14/model'), 'cuda', Path('.carry/data'))" >/dev/null 2>&1
  for run in first second; do
    timeout 150 python3 benchmarks/worker_profile.py --model /tmp/prof14/model --out "$OUT/worker-profile-$run.json" \
      >"$OUT/worker-profile-$run.log" 2>&1; echo "worker profile ($run) exit $?"
  done
  grep -v -i -E "warn|it/s\]" "$OUT/worker-profile-second.log" | head -90
  # is it this host's /tmp? the same imports from a copy of the packages in /dev/shm (RAM), each twice
  cp -r /tmp/site /dev/shm/site 2>/dev/null && for where in /tmp/site /dev/shm/site /tmp/site /dev/shm/site; do
    PYTHONPATH=$where:$PWD python3 -c "import time; t = time.perf_counter(); import torch, transformers, pandas, ray
from transformers import modeling_utils; print('imports from $where: %.2f s' % (time.perf_counter() - t))"
  done; df -h /tmp /dev/shm | tail -2
  ;;
eleventh)
  # Twelfth session, one H200 (the kernel runs; DTYPES= limits the data types):
  #   ONLY_KERNELS=1 BITS=3,4,5,6,7,8 CHOICES=uniform,uniform+vpt32 BUDGET=420 bash benchmarks/gpu_session.sh eleventh
  #   ONLY_KERNELS=1 BITS=6,7,8 DTYPES=fp,nf,quantile,dynamic CHOICES=packed,packed+narrow,packed+persist ...
  #   ONLY_KERNELS=1 BITS=3,4,5,6,7,8 CHOICES=nopacked BUDGET=420 bash benchmarks/gpu_session.sh eleventh
  #   then, alone: python3 benchmarks/quantize_kernels.py --quick --bits 3,4,5,6,7,8 --choices nopacked
  # eleventh session (~5 min): the kernels' GPU tests, the bucketed search's tables read through L1 against
  # the shared-memory copy at 4/6/8 bits, then the pre-flight cold, warm, and warm beside Ray's start
  # (`--prestart`, as on the CLI's first line: does pre-flight wait on it?). ONLY_KERNELS=1: no pre-flight
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_gpu.py 2>&1 | tail -4
  timeout 200 python3 benchmarks/quantize_kernels.py --quick --bits ${BITS:-4,6,8} ${DTYPES:+--dtypes $DTYPES} \
    --choices ${CHOICES:-l1,ind+l1,l1+vpt32,vpt32,w8} --out "$OUT/kernels-h200.json" >"$OUT/kernels.log" 2>&1
  echo "kernels exit $?"; tail -12 "$OUT/kernels.log"
  [ -n "${ONLY_KERNELS:-}" ] || python3 -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from benchmarks.evaluation import build_model
build_model('tiny', Path('/tmp/prof/model'), 'cuda', Path('.carry/data'))" >/dev/null 2>&1
  for run in ${ONLY_KERNELS:+none} cold warm prestart; do [ "$run" = none ] && break
    KBIT_CACHE=/tmp/prof/cache timeout 60 python3 benchmarks/preflight_profile.py --out "$OUT/preflight-$run.json" \
      $([ $run = prestart ] && echo --prestart) -- -m model.name_or_path=/tmp/prof/model eval=paper_ladder \
      eval.data_root=.carry/data quant.dtype=int quant.bits=3 >"$OUT/preflight-$run.log" 2>&1
    echo "preflight $run exit $?"; grep -o "startup phase=ray_start.*" "$OUT/preflight-$run.log"
    grep -v INFO "$OUT/preflight-$run.log" | head -14
  done
  ;;
*) echo "unknown phase $phase; use study, resume, final, after, tune, retuned, heldout, compile, gptq, gptq-study, gptq-1.4b, pending, startup, tenth, profile or eleventh" >&2; exit 2 ;;
esac
echo "phase $phase done in $((SECONDS - start)) s"
