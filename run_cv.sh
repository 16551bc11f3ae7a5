#!/usr/bin/env bash
# The whole experiment in one command: splits -> features -> folds -> ensemble test -> aggregate.
# Every step is skipped when its output exists; a killed fold resumes from its last.pt.
#
#   bash run_cv.sh                                  # real data under data/coco, SigLIP2 base
#   bash run_cv.sh --demo                           # synthetic COCO + tiny random SigLIP, ~1 min on 2 cores
#   RUN=outputs/bits32 bash run_cv.sh -- --bits 32  # an ablation: everything after -- goes to train.py
#   GPUS="0 1 2 3" bash run_cv.sh                   # folds in parallel, one per listed device at a time
#   FOLD_LIST=0 bash run_cv.sh -- --epochs 50       # a subset of folds (or --fold_list 0,2); aggregate: partial
#   bash run_cv.sh --study                          # the ablation set + report folder (study.py; --demo too)
#
# Settings (environment variables): DATA_ROOT, MODEL, RUN, FOLDS, SEED, FEATURES, SPLITS, PYTHON,
# EXTRACT_ARGS (extra flags for extract_features.py), EVAL_ARGS (extra flags for evaluate.py),
# FOLD_LIST (folds to train, e.g. "0,2"; default all FOLDS), GPUS (see below), SUMMARY (0: end with the
# result files' paths instead of printing their tables; study.py sets it), PLAN (1: make the data and
# splits, then print the remaining steps' commands, tab-separated, instead of running them; submit.py).
# GPUS: space- or comma-separated devices, one fold per entry at a time; a bare integer n means cuda:n, any
# other entry is a torch device string passed to train.py --device (cpu, cuda:1, ...); repeat an entry to run
# two folds on one device ("0 0"), GPUS="cpu cpu" runs two folds at once on the CPU (give each a share of the
# cores: -- --num_threads N). Each fold then writes $RUN/fold<k>/train.log; all are waited for, and the script
# fails naming every failed fold and its log. Unset: the folds run one after another with output on the
# terminal. Either way a fold with .done is skipped and one with last.pt resumes (train.py --resume).
# Feature cache: extract_features.py is always called; it answers "up to date" in seconds when FEATURES was
# made with these settings (MODEL, EXTRACT_ARGS' --views / --max_captions / --seed / --limit, the data files),
# resumes a killed extraction, and refuses with a one-line error naming the setting that differs otherwise (an
# existing cache made with other settings is never reused or overwritten: pass FEATURES=<new name>). With no
# COCO under DATA_ROOT an existing FEATURES is used as it is (EXTRACT_ARGS then stops the script).
# --study: study.py's ablation runs (bits 0-256, concat, KNN recipe, probe, zero-shot), each an ordinary run
# of this script, then <study>/report/ (outputs/study/report/, with --demo outputs/demo_study/report/);
# FOLD_LIST / --fold_list, GPUS and flags after -- apply to each.
set -euo pipefail
cd "$(dirname "$0")"
# a fresh machine: install requirements.txt when one of its packages is not installed (as tests/run.sh does);
# a PYTHON that cannot run the check (a test's stub) skips it
need=$("${PYTHON:-python}" -c 'import importlib.metadata as m, re
print(*[n for n in (re.split(r"[\s<>=!~;\[]", l.split("#")[0].strip())[0] for l in open("requirements.txt"))
        if n and not list(m.distributions(name=n))])' 2>/dev/null) || need=""
[ -z "$need" ] || { echo "run_cv.sh: installing requirements.txt (missing: $need)" >&2; "${PYTHON:-python}" -m pip install -r requirements.txt; }

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
demo=0
study=0
train_args=()
FOLD_LIST=${FOLD_LIST:-}   # a subset of folds, e.g. FOLD_LIST="0" (or --fold_list 0,2); default: all FOLDS
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1; shift ;;
    --study) study=1; shift ;;   # the ablation set + report: study.py (it calls this script once per run)
    --fold_list) [ $# -ge 2 ] || { echo "error: run_cv.sh: --fold_list needs a value like 0,2" >&2; exit 2; }
      FOLD_LIST=$2; shift 2 ;;
    --) shift; train_args=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: run_cv.sh: unknown argument '$1' (use --demo, --study, --fold_list, or put train.py flags after --)" >&2; exit 2 ;;
  esac
done
if [ "$study" = 1 ]; then
  study_args=()
  [ "$demo" = 1 ] && study_args+=(--demo)
  [ -n "$FOLD_LIST" ] && study_args+=(--fold_list "$FOLD_LIST")
  exec "${PYTHON:-python}" study.py "${study_args[@]}" -- ${train_args[@]+"${train_args[@]}"}
fi

PYTHON=${PYTHON:-python}
if [ "$demo" = 1 ]; then
  DATA_ROOT=${DATA_ROOT:-demo/coco}
  MODEL=${MODEL:-demo/tiny_siglip}
  RUN=${RUN:-outputs/demo}
  # a small synthetic problem: few epochs are enough, and they keep the demo near a minute; a flag after
  # -- replaces the demo's value of that flag (--lr 3e-3 stays, also for -- --bits 0, unless -- --lr is
  # given), so train.py's command line names each flag once
  demo_args=(--epochs 30 --patience 5 --batch_size 16 --accum_steps 1 --lr 3e-3 --num_threads 1)
  given=" ${train_args[*]-} "
  kept=()
  for ((i = 0; i < ${#demo_args[@]}; i += 2)); do
    f=${demo_args[i]}
    [[ "$given" == *" $f "* || "$given" == *" $f="* ]] || kept+=("$f" "${demo_args[i + 1]}")
  done
  train_args=(${kept[@]+"${kept[@]}"} ${train_args[@]+"${train_args[@]}"})
else
  DATA_ROOT=${DATA_ROOT:-data/coco}
  MODEL=${MODEL:-google/siglip2-base-patch16-256}
  RUN=${RUN:-outputs/siglip2_hash64}
fi
FOLDS=${FOLDS:-5}
SEED=${SEED:-42}
SPLITS=${SPLITS:-$DATA_ROOT/splits.json}
FEATURES=${FEATURES:-$DATA_ROOT/features_$(basename "$MODEL").safetensors}
EXTRACT_ARGS=${EXTRACT_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}

# one run_cv.sh per RUN folder: a lock file naming this shell (host, pid), released on exit; a second
# run_cv.sh on the same RUN stops here in one line naming the holder (locks.py)
made_run=0; [ -d "$RUN" ] || made_run=1   # a RUN made here and left empty is removed on exit
mkdir -p "$RUN"
"$PYTHON" locks.py acquire "$RUN/.lock" --pid $$ --what run_cv.sh || exit 2
trap '"$PYTHON" locks.py release "$RUN/.lock" --pid $$; [ "$made_run" = 0 ] || rmdir "$RUN" 2>/dev/null || true' EXIT
trap 'exit 75' TERM USR1   # preempted: a fold left last.pt; rerun (or requeue) to resume

echo "run_cv.sh settings:"
for v in DATA_ROOT MODEL RUN FOLDS SEED SPLITS FEATURES; do printf '  %-9s = %s\n' "$v" "${!v}"; done
printf '  %-9s = %s\n' "train.py" "${train_args[*]:-(defaults)}"

step() {  # step NAME CMD... : run a step, print what it does and how long it took
  local name=$1; shift
  if [ -n "${PLAN:-}" ] && [[ "$name" =~ ^(features|fold\ [0-9]+|ensemble\ test|aggregate)$ ]]; then
    printf 'plan\t%s' "$name"; printf '\t%s' "$@"; echo   # PLAN=1 (submit.py): print, do not run
    return 0
  fi
  local shown=("$@")
  [ "$1" = logged ] && shown=("${@:3}" "> $2")
  echo
  echo "== $name: ${shown[*]}"
  local t0=$SECONDS
  "$@"
  echo "== $name done in $((SECONDS - t0)) s"
}
skip() { echo; echo "== $1: skipped ($2 exists)"; }

# ---------------------------------------------------------------------------- data
if [ "$demo" = 1 ]; then
  if [ ! -f "$DATA_ROOT/dataset_coco.json" ]; then
    step "demo data" "$PYTHON" -c "import synthetic_coco; synthetic_coco.make_synthetic_coco('$DATA_ROOT', n_images=1000, seed=0)"
  fi
  if [ ! -f "$MODEL/config.json" ]; then   # demo/tiny_clip: the demo study's second backbone
    maker=make_tiny_siglip; [ "$(basename "$MODEL")" = tiny_clip ] && maker=make_tiny_clip
    step "demo model" "$PYTHON" -c "import tiny_models; tiny_models.$maker('$MODEL', image_size=32, seed=0)"
  fi
fi

missing=()
for f in dataset_coco.json annotations/instances_train2014.json annotations/instances_val2014.json train2014 val2014; do
  [ -e "$DATA_ROOT/$f" ] || missing+=("$DATA_ROOT/$f")
done
if [ ${#missing[@]} -gt 0 ] && [ ! -f "$FEATURES" ]; then
  cat >&2 <<EOF
error: run_cv.sh: COCO 2014 not found under DATA_ROOT=$DATA_ROOT. Missing:
$(printf '  %s\n' "${missing[@]}")
Needed (see README.md, "Data"):
  $DATA_ROOT/train2014/, $DATA_ROOT/val2014/      images: https://cocodataset.org/#download (2014 Train/Val images)
  $DATA_ROOT/annotations/instances_{train,val}2014.json   2014 Train/Val annotations (same page)
  $DATA_ROOT/dataset_coco.json                   Karpathy split: caption_datasets.zip (cs.stanford.edu/people/karpathy/deepimagesent)
Set DATA_ROOT=/path/to/coco if it lives elsewhere, or try the pipeline offline with: bash run_cv.sh --demo
EOF
  exit 2
fi

# ---------------------------------------------------------------------------- splits
if [ -f "$SPLITS" ]; then skip splits "$SPLITS"
else step splits "$PYTHON" make_splits.py --data_root "$DATA_ROOT" --folds "$FOLDS" --seed "$SEED" --out "$SPLITS"
fi

# ---------------------------------------------------------------------------- features (frozen towers, once)
# Never skipped because the file exists: extract_features.py answers "up to date" in seconds when FEATURES was
# made with these settings (MODEL, EXTRACT_ARGS' --views / --max_captions / --seed / --limit, the data files)
# and refuses with a one-line error naming the setting that differs otherwise; a killed extraction resumes.
if [ ${#missing[@]} -gt 0 ]; then  # no data to check FEATURES against (it exists, or we stopped above)
  if [ -n "$EXTRACT_ARGS" ]; then
    echo "error: run_cv.sh: EXTRACT_ARGS is set but COCO is not under DATA_ROOT=$DATA_ROOT, so $FEATURES cannot be checked against it; set DATA_ROOT, or unset EXTRACT_ARGS to use $FEATURES as it is" >&2
    exit 2
  fi
  echo; echo "== features: $FEATURES used as it is (no COCO under DATA_ROOT to check its settings against)"
else
  # shellcheck disable=SC2086
  step features "$PYTHON" extract_features.py --data_root "$DATA_ROOT" --model "$MODEL" --out "$FEATURES" $EXTRACT_ARGS
fi

# ---------------------------------------------------------------------------- folds
trained=0
folds=$(seq 0 $((FOLDS - 1)))
agg_args=()
if [ -n "$FOLD_LIST" ]; then
  folds=$(echo "$FOLD_LIST" | tr ',' ' ')
  for k in $folds; do
    [[ "$k" =~ ^[0-9]+$ ]] && [ "$k" -lt "$FOLDS" ] || { echo "error: run_cv.sh: FOLD_LIST entry '$k' is not a fold 0..$((FOLDS - 1))" >&2; exit 2; }
  done
  agg_args=(--allow_partial)   # the other folds are missing on purpose: aggregate labels the run partial
fi
todo=()
for k in $folds; do
  if [ -f "$RUN/fold$k/.done" ]; then skip "fold $k" "$RUN/fold$k/.done"; else todo+=("$k"); fi
done

fold_cmd() {  # fold_cmd K [DEVICE]: train.py's command line for fold K (--resume when it was interrupted)
  local d="$RUN/fold$1" resume=() device=()
  [ -f "$d/last.pt" ] && resume=(--resume)
  [ $# -ge 2 ] && device=(--device "$2")
  cmd=("$PYTHON" train.py --features "$FEATURES" --splits "$SPLITS" --fold "$1" --seed "$SEED" --out_dir "$d"
       ${resume[@]+"${resume[@]}"} ${train_args[@]+"${train_args[@]}"} ${device[@]+"${device[@]}"})
}

GPUS=${GPUS:-}
devices=()
for g in ${GPUS//,/ }; do  # a bare integer n -> cuda:n; anything else is a torch device string
  if [[ "$g" =~ ^[0-9]+$ ]]; then devices+=("cuda:$g")
  elif [[ "$g" =~ ^[a-z]+(:[0-9]+)?$ ]]; then devices+=("$g")
  else echo "error: run_cv.sh: GPUS entry '$g' is not a device; use integers (cuda:n) or device strings like cpu, cuda:1" >&2; exit 2
  fi
done
if [ ${#devices[@]} -gt 0 ] && [[ " ${train_args[*]-} " =~ \ --device[=\ ] ]]; then
  echo "error: run_cv.sh: GPUS chooses each fold's device; drop --device from the train.py flags after --" >&2; exit 2
fi

[ -z "${PLAN:-}" ] || devices=()   # PLAN: each fold is its own job
if [ ${#devices[@]} -eq 0 ]; then  # one fold after another, output on the terminal
  for k in ${todo[@]+"${todo[@]}"}; do
    fold_cmd "$k"
    step "fold $k" "${cmd[@]}"
    [ -n "${PLAN:-}" ] || touch "$RUN/fold$k/.done"   # PLAN: submit.py's fold job touches it
    trained=1
  done
elif [ ${#todo[@]} -gt 0 ]; then  # one fold per device slot at a time, each with its own log
  echo; echo "== folds ${todo[*]}: in parallel on ${devices[*]} (logs: $RUN/fold<k>/train.log)"
  pid_of=() fold_of=() started=() failed=()  # indexed by slot
  stop_folds() { for p in ${pid_of[@]+"${pid_of[@]}"}; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; }
  trap 'stop_folds; exit 130' INT TERM
  reap() {  # reap SLOT: the slot's fold has exited: .done on success, else remember it
    local s=$1 k=${fold_of[$1]} rc=0
    wait "${pid_of[$s]}" || rc=$?
    if [ "$rc" = 0 ]; then
      touch "$RUN/fold$k/.done"
      echo "== fold $k done in $((SECONDS - started[s])) s on ${devices[$s]}"
    else
      failed+=("fold $k (exit $rc, log $RUN/fold$k/train.log)")
      echo "== fold $k FAILED (exit $rc) on ${devices[$s]}; the end of $RUN/fold$k/train.log:" >&2
      tail -n 5 "$RUN/fold$k/train.log" | sed 's/^/   | /' >&2
    fi
    pid_of[$s]=""
  }
  next=0
  while :; do
    for s in "${!devices[@]}"; do  # fill free slots, reap finished folds
      if [ -n "${pid_of[$s]-}" ] && ! kill -0 "${pid_of[$s]}" 2>/dev/null; then reap "$s"; fi
      if [ -z "${pid_of[$s]-}" ] && [ "$next" -lt ${#todo[@]} ]; then
        k=${todo[$next]}; next=$((next + 1))
        mkdir -p "$RUN/fold$k"
        fold_cmd "$k" "${devices[$s]}"
        echo "== fold $k: started on ${devices[$s]}: ${cmd[*]}"
        "${cmd[@]}" > "$RUN/fold$k/train.log" 2>&1 &
        pid_of[$s]=$! fold_of[$s]=$k started[$s]=$SECONDS
      fi
    done
    busy=0
    for p in ${pid_of[@]+"${pid_of[@]}"}; do [ -n "$p" ] && busy=1; done
    [ "$busy" = 0 ] && [ "$next" -ge ${#todo[@]} ] && break
    sleep 1
  done
  trap - INT; trap 'exit 75' TERM
  trained=1
  if [ ${#failed[@]} -gt 0 ]; then
    msg=$(printf '%s; ' "${failed[@]}")
    echo "error: run_cv.sh: ${#failed[@]} of ${#todo[@]} folds failed: ${msg%; }; fix the cause and rerun (finished folds are skipped, interrupted ones resume)" >&2
    exit 1
  fi
fi

# ---------------------------------------------------------------------------- ensemble test + aggregate
# the test first: aggregate.py's literature table reads eval_test/metrics.json
tested=0
if [ "$trained" = 0 ] && [ -f "$RUN/eval_test/metrics.md" ]; then skip "ensemble test" "$RUN/eval_test/metrics.md"
else
  eval_args=()
  [ ${#missing[@]} -eq 0 ] && eval_args+=(--data_root "$DATA_ROOT")   # the images, for examples.png
  [ ${#devices[@]} -gt 0 ] && eval_args+=(--device "${devices[0]}")   # GPUS: the first device
  [ ${#agg_args[@]} -gt 0 ] && eval_args+=(--allow_partial)           # FOLD_LIST: ensemble the folds trained
  # shellcheck disable=SC2086
  step "ensemble test" "$PYTHON" evaluate.py --ensemble "$RUN" --features "$FEATURES" --splits "$SPLITS" \
    --split test --thresholds oof --out_dir "$RUN/eval_test" ${eval_args[@]+"${eval_args[@]}"} $EVAL_ARGS
  tested=1
fi
logged() {  # logged LOG CMD...: CMD's output into LOG, its note / wrote lines here (its tables: below)
  local log=$1 rc=0; shift
  "$@" > "$log" || rc=$?
  if [ "$rc" != 0 ]; then tail -n 5 "$log"; return "$rc"; fi
  grep -E '^(note|wrote)' "$log" || true
}
if [ "$trained" = 0 ] && [ "$tested" = 0 ] && [ -f "$RUN/cv_results.csv" ]; then skip aggregate "$RUN/cv_results.csv"
else step aggregate logged "$RUN/aggregate.log" "$PYTHON" aggregate.py "$RUN" ${agg_args[@]+"${agg_args[@]}"}
fi

[ -z "${PLAN:-}" ] || exit 0
echo
if [ "${SUMMARY:-1}" = 0 ]; then  # study.py: the tables go into its report
  echo "== results: $RUN/cv_results.md, $RUN/eval_test/metrics.md"
  exit 0
fi
echo "== cross-validation ($RUN/cv_results.md)"
cat "$RUN/cv_results.md"
echo
echo "== hold-out test, fold models and their ensemble ($RUN/eval_test/metrics.md)"
cat "$RUN/eval_test/metrics.md"
