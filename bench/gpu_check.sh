#!/bin/bash
# GPU check, run from the repository root on a machine with CUDA: one-epoch quality runs of the given
# recipes (bf16, batch 128, kNN k 200 T 0.1; rows named <recipe>-gpu, the untrained encoder as
# untrained-<recipe>-gpu) while time is left, then a bf16/fp32 speed table. Logs and results go to $OUT.
#
#   OUT=/tmp/out DEADLINE=400 bash bench/gpu_check.sh cmc:0 untrained-cmc:0 deepcluster:0 swav:2
#
# DEADLINE: seconds for the whole script (runs that would not fit are skipped, never cut short
# silently). WHEELS: a folder of wheels to install first into /tmp/site (a machine without pydantic
# or datasets). DATA: a folder with train.parquet and test.parquet (default ../shared/data/cifar10).
# SUFFIX: the row-name suffix (default -gpu). The test suite is not run here: it hides CUDA (tests/conftest.py).
set -u
export PYTHONUNBUFFERED=1 HF_HOME=${HF_HOME:-/tmp/hf} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
PY=${PY:-python3}; DEADLINE=${DEADLINE:-400}; W=${W:-8}; SUFFIX=${SUFFIX:--gpu}
T0=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - T0))); }
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$OUT/main.log"; }
if [ -n "${WHEELS:-}" ]; then
  rm -rf /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L 2>&1 | tee -a "$OUT/main.log"
$PY -c "import torch, clcli; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/main.log"
cd bench || exit 1
for job in "$@"; do  # recipe:seed, or untrained-<recipe>:seed
  name=${job%%:*}; seed=${job##*:}
  if [ "$(left)" -lt 100 ]; then log "skip $job (time)"; continue; fi
  if [[ $name == untrained-* ]]; then what=(untrained --baseline-recipe "${name#untrained-}"); else what=("$name"); fi
  log "start $job"
  timeout $(($(left) - 40)) $PY quality.py "${what[@]}" --seed "$seed" --name "$name$SUFFIX" --workers "$W" \
    --workdir /tmp/gpu-work ${DATA:+--data "$DATA"} >> "$OUT/quality.log" 2>&1
  log "end $job rc=$? knn $($PY -c "import json; r=[x for x in json.load(open('results/quality.json')) if x['method']=='$name$SUFFIX' and x['seed']==$seed]; print(r[-1]['knn_top1'] if r else None)")"
  cp results/quality.json "$OUT/quality.json"
done
if [ "$(left)" -gt 45 ]; then
  timeout $(($(left) - 10)) $PY speed.py ${SPEED:-simclr swav cmc} --batch 256 --precision bf16 fp32 --steps 15 \
    --workers "$W" ${DATA:+--data "$DATA/train.parquet"} > "$OUT/speed.log" 2>&1
  cp results/speed.json "$OUT/speed.json"
fi
log done
