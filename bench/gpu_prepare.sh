#!/bin/bash
# Prepare what travels to a GPU machine lent through the workplace's device tool: a folder .dev/
# (ignored by git) with CIFAR-10's parquet files and the wheels the machine's Python 3.12 lacks
# (pydantic and datasets with their pure-Python needs; it has torch, torchvision, typer, rich,
# safetensors, huggingface_hub, pyarrow, pandas). 62 MiB with the working tree, under the 64 MiB a call
# may carry: leave out the bench results or logs if they grow.
# Run from the repository root, on a machine that reaches PyPI:
#
#   bash bench/gpu_prepare.sh
#
# then, on the device (carry [".dev"]), for example:
#
#   DATA=.dev/cifar10 WHEELS=.dev/wheels OUT=$OUT DEADLINE=540 \
#     JOBS=bench/notes/gpu_jobs/simsiam-lightly.txt RESUME="simclr swav" bash bench/gpu_check.sh
#
# Do not add huggingface_hub: a newer wheel than the machine's needs packages it lacks, and its own
# version satisfies datasets.
set -eu
DEST=${DEST:-.dev}
DATA_SRC=${DATA_SRC:-../shared/data/cifar10}
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf "$DEST/wheels"
mkdir -p "$DEST/wheels" "$DEST/cifar10"
cp "$DATA_SRC/train.parquet" "$DATA_SRC/test.parquet" "$DEST/cifar10/"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
${PY:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST/wheels" \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
ls "$DEST/wheels"
du -sh "$DEST"
