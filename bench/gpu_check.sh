#!/bin/bash
# GPU check, run from the repository root on a machine with CUDA: one-epoch quality runs (bf16, batch
# 128, kNN k 200 T 0.1) while time is left, then, if asked, a reproducibility check, then a
# bf16/fp32 speed table. Logs and results go to $OUT.
#
#   OUT=/tmp/out DEADLINE=400 bash bench/gpu_check.sh cmc:0 untrained-cmc:0 deepcluster:0 swav:2
#   OUT=/tmp/out DEADLINE=540 JOBS=bench/notes/gpu_jobs/simsiam-lightly.txt RESUME="simclr swav" bash bench/gpu_check.sh
#
# A job on the command line is recipe:seed (row <recipe>$SUFFIX) or untrained-<recipe>:seed (the
# recipe's untrained encoder). JOBS: a file of further jobs, one per line, "row recipe seed
# [override ...]" (overrides as for --set, without spaces; '#' starts a comment; recipe
# "untrained-<recipe>" as above). RESUME: recipes for bench/resume_check.py on CUDA, once as they
# are and once with trainer.deterministic=true, and a speed row of each with it. DEADLINE: seconds
# for the whole script (runs that would not fit are skipped, never cut short silently). WHEELS: a
# folder of wheels to install first into /tmp/site (a machine without pydantic or datasets). DATA: a
# folder with train.parquet and test.parquet (default ../shared/data/cifar10). SUFFIX: the row-name
# suffix for command-line jobs (default -gpu). bench/gpu_prepare.sh builds WHEELS and DATA. The test
# suite is not run here: it hides CUDA (tests/conftest.py).
set -u
export PYTHONUNBUFFERED=1 HF_HOME=${HF_HOME:-/tmp/hf} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
PY=${PY:-python3}; DEADLINE=${DEADLINE:-400}; W=${W:-8}; SUFFIX=${SUFFIX:--gpu}
T0=$(date +%s)
[ -n "${DATA:-}" ] && DATA=$(realpath "$DATA")      # the runs below start in bench/
[ -n "${WHEELS:-}" ] && WHEELS=$(realpath "$WHEELS")
left() { echo $((DEADLINE - ($(date +%s) - T0))); }
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$OUT/main.log"; }
if [ -n "${WHEELS:-}" ]; then
  rm -rf /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L 2>&1 | tee -a "$OUT/main.log"
$PY -c "import torch, clcli; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/main.log"
[ -n "${JOBS:-}" ] && JOBS=$(realpath "$JOBS")
cd bench || exit 1
set -f  # overrides such as method.projector=[512,512,128] are not file patterns
rows=(); recipes=(); seeds=(); extras=()
for job in "$@"; do rows+=("${job%%:*}$SUFFIX"); recipes+=("${job%%:*}"); seeds+=("${job##*:}"); extras+=(""); done
if [ -n "${JOBS:-}" ]; then
  while read -r row recipe seed rest; do
    [[ -z "$row" || $row == \#* ]] && continue
    rows+=("$row"); recipes+=("$recipe"); seeds+=("$seed"); extras+=("$rest")
  done < "$JOBS"
fi
for i in "${!rows[@]}"; do
  row=${rows[$i]}; name=${recipes[$i]}; seed=${seeds[$i]}; sets=()
  for o in ${extras[$i]}; do sets+=(--set "$o"); done
  if [ "$(left)" -lt 100 ]; then log "skip $row seed $seed (time)"; continue; fi
  if [[ $name == untrained-* ]]; then what=(untrained --baseline-recipe "${name#untrained-}"); else what=("$name"); fi
  log "start $row ($name seed $seed ${extras[$i]})"
  timeout $(($(left) - 40)) $PY quality.py "${what[@]}" --seed "$seed" --name "$row" --workers "$W" "${sets[@]}" \
    --workdir /tmp/gpu-work ${DATA:+--data "$DATA"} >> "$OUT/quality.log" 2>&1
  log "end $row seed $seed rc=$? knn $($PY -c "import json; r=[x for x in json.load(open('results/quality.json')) if x['method']=='$row' and x['seed']==$seed]; print(r[-1]['knn_top1'] if r else None)")"
  cp results/quality.json "$OUT/quality.json"
done
if [ -n "${RESUME:-}" ] && [ "$(left)" -gt 60 ]; then
  for det in false true; do
    log "resume check (deterministic=$det): $RESUME"
    timeout $(($(left) - 20)) $PY resume_check.py $RESUME --device cuda --set trainer.deterministic=$det \
      ${DATA:+--data "$DATA/train.parquet"} >> "$OUT/resume.log" 2>&1
    log "rc=$?"
  done
  cp results/resume.json "$OUT/resume.json" 2>/dev/null
fi
if [ "$(left)" -gt 45 ]; then
  timeout $(($(left) - 10)) $PY speed.py ${SPEED:-simclr swav cmc} --batch 256 --precision bf16 fp32 --steps 15 \
    --workers "$W" ${DATA:+--data "$DATA/train.parquet"} > "$OUT/speed.log" 2>&1
  if [ -n "${RESUME:-}" ] && [ "$(left)" -gt 30 ]; then  # what deterministic kernels cost
    timeout $(($(left) - 10)) $PY speed.py $RESUME --batch 256 --precision bf16 --steps 15 --workers "$W" \
      --set trainer.deterministic=true ${DATA:+--data "$DATA/train.parquet"} >> "$OUT/speed.log" 2>&1
  fi
  cp results/speed.json "$OUT/speed.json"
fi
log done
