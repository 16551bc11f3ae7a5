#!/usr/bin/env bash
# The whole experiment in one command: splits -> features -> folds -> aggregate -> ensemble test.
# Every step is skipped when its output exists (features: with the same settings); a killed fold resumes.
#
#   bash run_cv.sh                                  # real data under data/coco, SigLIP2 base
#   bash run_cv.sh --demo                           # synthetic COCO + tiny random SigLIP, ~2 minutes on a CPU
#   RUN=outputs/bits32 bash run_cv.sh -- --bits 32  # an ablation: everything after -- goes to train.py
#
# Settings (environment variables): DATA_ROOT, MODEL, RUN, FOLDS, SEED, FEATURES, SPLITS, PYTHON,
# EXTRACT_ARGS (extra flags for extract_features.py), EVAL_ARGS (extra flags for evaluate.py).
set -euo pipefail
cd "$(dirname "$0")"
# a fresh machine: install requirements.txt when one of its packages is not installed (as tests/run.sh does)
need=$("${PYTHON:-python}" -c 'import importlib.metadata as m, re
print(*[n for n in (re.split(r"[\s<>=!~;\[]", l.split("#")[0].strip())[0] for l in open("requirements.txt"))
        if n and not list(m.distributions(name=n))])')
[ -z "$need" ] || { echo "run_cv.sh: installing requirements.txt (missing: $need)" >&2; "${PYTHON:-python}" -m pip install -r requirements.txt; }

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
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
  # a small synthetic problem: few epochs are enough, and they keep the demo near two minutes; flags after --
  # come later on train.py's command line, so they override only what they name (--lr 3e-3 stays, also for
  # -- --bits 0, unless -- --lr is given)
  train_args=(--epochs 30 --patience 5 --batch_size 16 --accum_steps 1 --lr 3e-3 --num_threads 1 ${train_args[@]+"${train_args[@]}"})
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

echo "run_cv.sh settings:"
for v in DATA_ROOT MODEL RUN FOLDS SEED SPLITS FEATURES; do printf '  %-9s = %s\n' "$v" "${!v}"; done
printf '  %-9s = %s\n' "train.py" "${train_args[*]:-(defaults)}"

step() {  # step NAME CMD... : run a step, print what it does and how long it took
  local name=$1; shift
  echo
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  echo "== $name done in $((SECONDS - t0)) s"
}
skip() { echo; echo "== $1: skipped ($2 exists)"; }

# ---------------------------------------------------------------------------- data
if [ "$demo" = 1 ]; then
  if [ ! -f "$DATA_ROOT/dataset_coco.json" ]; then
    step "demo data" "$PYTHON" -c "import synthetic; synthetic.make_synthetic_coco('$DATA_ROOT', n_images=1000, seed=0)"
  fi
  if [ ! -f "$MODEL/config.json" ]; then
    step "demo model" "$PYTHON" -c "import synthetic; synthetic.make_tiny_siglip('$MODEL', image_size=32, seed=0)"
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
for k in $folds; do
  d="$RUN/fold$k"
  if [ -f "$d/.done" ]; then skip "fold $k" "$d/.done"; continue; fi
  resume=()
  [ -f "$d/last.pt" ] && resume=(--resume)   # interrupted earlier: continue where it stopped
  step "fold $k" "$PYTHON" train.py --features "$FEATURES" --splits "$SPLITS" --fold "$k" --seed "$SEED" \
    --out_dir "$d" "${resume[@]}" "${train_args[@]}"
  touch "$d/.done"
  trained=1
done

# ---------------------------------------------------------------------------- aggregate + ensemble test
if [ "$trained" = 0 ] && [ -f "$RUN/cv_results.csv" ]; then skip aggregate "$RUN/cv_results.csv"
else step aggregate "$PYTHON" aggregate.py "$RUN" ${agg_args[@]+"${agg_args[@]}"}
fi
if [ "$trained" = 0 ] && [ -f "$RUN/eval_test/metrics.csv" ]; then skip "ensemble test" "$RUN/eval_test/metrics.csv"
else
  # shellcheck disable=SC2086
  step "ensemble test" "$PYTHON" evaluate.py --ensemble "$RUN" --features "$FEATURES" --splits "$SPLITS" \
    --split test --thresholds oof --data_root "$DATA_ROOT" --out_dir "$RUN/eval_test" $EVAL_ARGS
fi

echo
echo "== cross-validation ($RUN/cv_results.md)"
cat "$RUN/cv_results.md"
echo
echo "== hold-out test, 5-fold ensemble ($RUN/eval_test/metrics.csv)"
cat "$RUN/eval_test/metrics.csv"
