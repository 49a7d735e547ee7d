#!/usr/bin/env bash
# Run the GPU training job as one command of known duration, with no network needed.
#
# Usage: benchmarks/gpu_train_run.sh MODEL DATA [--set KEY=VALUE ...]
#   MODEL  the model's GGUF file (converted once into the masktok cache) or a converted model folder,
#          for example SmolLM2-135M-Instruct.Q4_1.gguf
#   DATA   a folder holding GSM8K's train.jsonl
#   Any further arguments are passed to `masktok train` as recipe overrides.
# Environment:
#   WHEELS            folder of wheels to install from before training (pip, no index); unset: install nothing
#   MAX_TIME_MINUTES  training budget, on-policy generation included (default 7.5)
#   OUTPUT_DIR        adapter folder (default outputs/smollm2-135m-gsm8k-gpu); it must not hold an adapter yet
#   PYTHON            Python interpreter (default python3)
#
# Duration: MAX_TIME_MINUTES plus setup. Setup is the wheel install, the imports, the GGUF conversion
# on first use (about a minute for SmolLM2-135M on a CPU) and the final save. With the defaults the
# whole job is planned to end in under 10 minutes; it prints the time of each phase.
# The training summary is printed last and written to OUTPUT_DIR/summary.json.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL DATA [--set KEY=VALUE ...]" >&2
    exit 2
fi
model=$1
data=$2
shift 2

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
budget=${MAX_TIME_MINUTES:-7.5}
output_dir=${OUTPUT_DIR:-outputs/smollm2-135m-gsm8k-gpu}

# No Hub access: transformers, datasets and huggingface_hub stay offline, and TRL sends no
# telemetry request when the trainer is created.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

for path in "$model" "$data"; do
    if [[ ! -e $path ]]; then
        echo "error: $path not found" >&2
        exit 2
    fi
done

cd "$repo"
began=$SECONDS

if [[ -n ${WHEELS:-} ]]; then
    echo "== installing masktok-peft and missing packages from $WHEELS"
    "$python" -m pip install --quiet --no-index --find-links "$WHEELS" -e .
    echo "== install took $((SECONDS - began)) s"
fi

"$python" - <<'EOF'
import torch

if torch.cuda.is_available():
    print(f"== device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
else:
    print(f"== device: CPU only (no CUDA device found), torch {torch.__version__}")
EOF

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== training with recipes/smollm2-135m-gsm8k-gpu.yaml, budget $budget minutes"
train_began=$SECONDS
"$python" -m masktok_peft.cli train recipes/smollm2-135m-gsm8k-gpu.yaml \
    --set "model=$model" \
    --set "data.path=$data" \
    --set "training.output_dir=$output_dir" \
    --set "training.max_time_minutes=$budget" \
    "$@" | tee "$log"
echo "== masktok train took $((SECONDS - train_began)) s (model loading, on-policy text, training, saving)"

# `masktok train` prints the Trainer's log lines first and the summary, a JSON object, last.
"$python" - "$log" "$output_dir/summary.json" <<'EOF'
import json
import sys

text = open(sys.argv[1]).read()
summary = json.loads(text[text.rfind("\n{\n") + 1 :])
with open(sys.argv[2], "w") as handle:
    json.dump(summary, handle, indent=2)
print(f"== summary written to {sys.argv[2]}")
EOF
echo "== whole job took $((SECONDS - began)) s"
