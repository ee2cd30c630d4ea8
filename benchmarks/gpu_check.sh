#!/usr/bin/env bash
# The CUDA paths, checked on a GPU machine (run by hand; the test suite never needs a GPU):
#   bash benchmarks/gpu_check.sh [OUT]
# 1. the card; 2. the Kornia pipelines on the CPU and on CUDA (bench_augment.py); 3. the quickstart on
# CUDA under each mixed-precision mode (wall time, training images/s, test metrics); 4. training
# throughput of ResNet-18/50 at 224 px under each mode (bench_train.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, kornia; print('torch', torch.__version__, 'kornia', kornia.__version__, 'cuda', torch.version.cuda)"
python benchmarks/bench_augment.py --batch 32 --size 256
for amp in off bf16 fp16; do
  start=$SECONDS
  python -m corex run recipes/quickstart.yaml --set device=cuda --set stages.train.amp="$amp" --set stages.test.amp="$amp" \
    --out "$out/quickstart-$amp" --overwrite > "$out/quickstart-$amp.log" 2>&1
  code=$?
  python - "$out/quickstart-$amp" "$amp" "$code" "$((SECONDS - start))" <<'EOF'
import json, statistics, sys
from pathlib import Path
run, amp, code, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
test = next((v for k, v in results.get("stages", {}).items() if k == "test"), {})
metrics = test.get("metrics", test) if isinstance(test, dict) else {}
pick = {k: round(v, 3) for k, v in metrics.items() if k in ("macro_f1", "auroc", "dice/positive", "ece") and isinstance(v, (int, float))}
print(f"quickstart amp={amp}: exit {code}, {seconds:.0f} s wall, train {statistics.median(rates) if rates else float('nan'):.0f} img/s (median epoch), test {pick}")
EOF
  [ "$code" = 0 ] || tail -20 "$out/quickstart-$amp.log"
done
python benchmarks/bench_train.py --encoders resnet18 resnet50 --size 224 --batch 64
