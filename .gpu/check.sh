#!/usr/bin/env bash
# GPU check of digits on the lent device machine (one H100, torch 2.11 + CUDA, no network, no Java).
#
#   bash .gpu/check.sh            (from the repo root; the run tool carries .gpu and .whl)
#
# Carried beside the working tree (both folders ignored through .git/info/exclude):
#   .whl/torch_model_archiver-0.12.0-py3-none-any.whl   installed with the README's pip --target recipe
#   .gpu/torchserve.tar.xz  torchserve 0.12.0 (ts/ + dist-info) from its wheel; model-server.jar repacked with
#                           stored entries and without its Windows/macOS/aarch64 natives (42 MB wheel -> 17 MB)
#   .gpu/jre.tar.xz         a jlink'd Java 17 runtime (Debian's OpenJDK 17.0.15; java.beans is needed) + libz.so.1
#   .gpu/mnist.tar.xz       the four plain MNIST IDX files (load_mnist accepts only the full 60,000/10,000 sets)
#
# Phases, each under its own time limit inside a global budget (BUDGET seconds, default 420):
#   0 setup: packages, Java, MNIST, `torchserve` beside sys.executable, versions
#   1 pytest -m gpu over the three files holding the GPU tests          -> $OUT/gpu-tests.log
#   2 CLI and handler CUDA paths the tests miss (resnet18, --weights, auto, export, cuda:1 refusal,
#     real cnn on cuda:0 through the handler's loader, same-seed determinism)  -> $OUT/cli-checks.log
#   3 the non-gpu tests of the same two unit-test files, on a machine where `auto` means CUDA
#                                                                       -> $OUT/cuda-machine-tests.log
# CHECK_WITHOUT_CUDA=1 runs phase 2 where CUDA is missing too (a dry run of its commands: each fails fast).
# Everything printed also goes to $OUT/check.log; TorchServe's logs of phase 1 to $OUT/torchserve-logs.tar.gz.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=${OUT:-/tmp/digits-gpu-out}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/digits-gpu}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT" "$WORK"
export WORK

section() { printf '\n===== %s  (t=%ss)\n' "$*" "$SECONDS"; }
left() { echo $((BUDGET - SECONDS)); }
cap() { local l; l=$(left); [ "$l" -lt 20 ] && l=20; if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi; }  # min(cap, left), 20 s at least

untar() {  # untar FILE.tar.xz DIR
    mkdir -p "$2"
    if command -v xz >/dev/null 2>&1; then
        tar -xJf "$1" -C "$2"
    else
        python3 - "$1" "$2" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    try:
        archive.extractall(sys.argv[2], filter="tar")
    except TypeError:
        archive.extractall(sys.argv[2])
EOF
    fi
}

setup() {
    section "0 setup"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "FATAL: pip install of .whl/*.whl failed"; return 1; }
    untar .gpu/torchserve.tar.xz "$SITE" || { echo "FATAL: cannot unpack torchserve"; return 1; }
    untar .gpu/jre.tar.xz "$WORK" || { echo "FATAL: cannot unpack the JRE"; return 1; }
    untar .gpu/mnist.tar.xz "$WORK/data" || { echo "FATAL: cannot unpack MNIST"; return 1; }

    # digits itself, installed as it installs anywhere (its layer folders become digits.<layer>): the checkout's
    # own digits/ folder must not come first on the path, or `digits.export` and the others would be missing
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" "$REPO" \
        || { echo "FATAL: pip install of the checkout into $SITE failed (needs setuptools>=68)"; return 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1  # Python >= 3.11: `python3 -m pytest` run here must not put ./digits before $SITE's
    export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
    export DIGITS_DATA="$WORK/data"            # training.data.default_data_dir(); tests take the default
    export JAVA_HOME="$WORK/jre"               # serving.server.find_java() and ts/model_server.py read it
    if ! ldconfig -p 2>/dev/null | grep -q 'libz\.so\.1 '; then
        echo "no libz.so.1 on this machine: using the carried one for Java"
        export LD_LIBRARY_PATH="$JAVA_HOME/extra-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    command -v java >/dev/null 2>&1 && echo "the machine has its own java: $(command -v java) (not used)"

    # serving.server.torchserve_command runs Path(sys.executable).parent / "torchserve"; pip --target put
    # no script there, so write the console script TorchServe's wheel declares (ts.model_server:start)
    local exe bin
    exe=$(python3 -c 'import sys; print(sys.executable)')
    bin=$(dirname "$exe")
    if [ ! -e "$bin/torchserve" ]; then
        printf '#!%s\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n' "$exe" >"$bin/torchserve" \
            && chmod +x "$bin/torchserve" && echo "wrote $bin/torchserve" \
            || echo "WARNING: cannot write $bin/torchserve: tests/serving/test_gpu.py will fail to start TorchServe"
    else
        echo "$bin/torchserve exists already (kept; it imports ts from PYTHONPATH first)"
    fi

    section "versions"
    uname -m
    nvidia-smi -L || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    "$JAVA_HOME/bin/java" -version 2>&1 | head -2 || echo "WARNING: the carried java does not run"
    python3 - <<'EOF'
import sys
import numpy, onnx, onnxruntime, onnxscript, torch, torchvision
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available(),
      "| devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0),
          "| cudnn", torch.backends.cudnn.version())
print("torchvision", torchvision.__version__, "| onnx", onnx.__version__, "| onnxscript", onnxscript.__version__,
      "| numpy", numpy.__version__)
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_device(), onnxruntime.get_available_providers())
import model_archiver, ts
from ts.version import __version__ as ts_version
print("ts", ts_version, ts.__file__, "| model_archiver", model_archiver.__file__)
import digits.cli, digits.export.convert, digits.serving.archive, digits.serving.server, digits.training.train  # noqa: F401
sys.path.insert(0, "handlers")
import digit_handler  # noqa: F401  (as a TorchServe worker imports it)
print("project imports: ok")
EOF
}

collect_torchserve() {  # logs of the servers phase 1 started, and stop any that outlived their test
    local pidfile pid
    (cd "$WORK" && find pt-gpu \( -name '*.log' -o -name torchserve.out -o -name config.properties \) -print0 2>/dev/null \
        | tar -czf "$OUT/torchserve-logs.tar.gz" --null -T - 2>/dev/null)
    while IFS= read -r pidfile; do
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q org.pytorch.serve.ModelServer; then
            echo "stopping leftover TorchServe pid $pid ($pidfile)"
            kill "$pid"
        fi
    done < <(find "$WORK/pt-gpu" -name .model_server.pid 2>/dev/null)
}

gpu_tests() {
    section "1 pytest -m gpu"
    local flags=(-m gpu -v -rs --durations=10 -p no:cacheprovider --basetemp="$WORK/pt-gpu")
    python3 -c 'import pytest_timeout' 2>/dev/null && flags+=(--timeout=200)
    timeout -k 10 "$(cap 260)" python3 -m pytest "${flags[@]}" \
        tests/training/test_train.py tests/handlers/test_handler_loading.py tests/serving/test_gpu.py 2>&1 \
        | tee "$OUT/gpu-tests.log"
    local rc=${PIPESTATUS[0]}
    echo "phase 1 exit code: $rc"
    collect_torchserve
    if python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
        && grep -q 'SKIPPED' "$OUT/gpu-tests.log"; then
        echo "NOTE: CUDA is available but some gpu tests were skipped (see the -rs summary above)"
    fi
}

cli_checks() {
    section "2 CLI and handler CUDA paths"
    if [ -z "${CHECK_WITHOUT_CUDA:-}" ] && ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "no CUDA here: phase 2 skipped (CHECK_WITHOUT_CUDA=1 runs it anyway: a dry run of its commands)"
        return 0
    fi
    if [ "$(left)" -lt 40 ]; then
        echo "only $(left)s of the budget left: phase 2 skipped"
        return 0
    fi
    timeout -k 10 "$(cap 150)" bash -c '
        A=$WORK/cli
        step() { echo; echo "--- $*"; }
        step "train cnn --device cuda";       python3 -m digits train cnn --device cuda --epochs 1 --limit 2000 --out "$A" --quiet || echo "FAIL: exit $?"
        step "train mlp --device auto";       python3 -m digits train mlp --device auto --epochs 1 --limit 2000 --out "$A" --quiet || echo "FAIL: exit $?"
        step "train resnet18 --device cuda";  python3 -m digits train resnet18 --device cuda --epochs 1 --limit 512 --out "$A" --quiet || echo "FAIL: exit $?"
        python3 -c "import torch, torchvision; torch.save(torchvision.models.resnet18().state_dict(), \"$WORK/imagenet.pt\")"
        step "train resnet18 --weights --device cuda:0 (frozen backbone)"
        python3 -m digits train resnet18 --device cuda:0 --weights "$WORK/imagenet.pt" --epochs 1 --limit 256 --out "$WORK/cli-tl" --quiet || echo "FAIL: exit $?"
        step "train mlp --device cuda:1 (one GPU: must be one line, exit 2)"
        python3 -m digits train mlp --device cuda:1 --out "$WORK/x"; echo "exit code: $? (expected 2)"
        step "devices recorded in metrics.json"
        for m in cnn mlp resnet18; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d[\"device\"], \"test_accuracy\", d[\"test_accuracy\"], \"train_seconds %.1f\" % d[\"train_seconds\"])" "$A/$m/metrics.json" $m || echo "FAIL: no metrics for $m"; done
        step "export cnn (checkpoint trained on CUDA; parity on all 10,000 test digits)"
        python3 -m digits export cnn --artifacts "$A" | tail -n 15; echo "exit code: ${PIPESTATUS[0]} (expected 0)"
        step "handler loader: the exported cnn on cuda:0 against the CPU"
        python3 - "$A/cnn" <<EOF
import sys
from pathlib import Path
import torch
sys.path.insert(0, "handlers")
from digit_model import load_predictor
from digits.training.data import load_mnist
from digits.training.train import normalise
x = normalise(load_mnist(log=lambda *_: None).test_images[:512])
for name in ("model.pt", "model.onnx"):
    path = Path(sys.argv[1]) / name
    cpu = load_predictor(path, torch.device("cpu"))(x)
    gpu = load_predictor(path, torch.device("cuda:0"))(x)
    same = (cpu.argmax(1) == gpu.argmax(1)).float().mean().item()
    print(f"{name}: max |cuda - cpu| {(gpu - cpu).abs().max().item():.2e}, argmax agreement {same:.4f}, dtype {gpu.dtype}, device {gpu.device}")
# ts/torch_handler/base_handler.py (imported by digit_handler) calls torch.set_float32_matmul_precision("high")
# at import on GPUs of capability >= 8.0: every TorchServe worker then runs fp32 matmuls in TF32
print("matmul precision before importing digit_handler:", torch.get_float32_matmul_precision())
import digit_handler  # noqa: F401
print("matmul precision after importing digit_handler:", torch.get_float32_matmul_precision())
path = Path(sys.argv[1]) / "model.pt"
cpu = load_predictor(path, torch.device("cpu"))(x)
gpu = load_predictor(path, torch.device("cuda:0"))(x)
print(f"model.pt after the import: max |cuda - cpu| {(gpu - cpu).abs().max().item():.2e}")
EOF
        step "same seed twice on CUDA (cnn, 1 epoch, 1000 digits): identical weights?"
        python3 - <<EOF
import torch
from digits.training.train import TrainConfig, train
sd = []
for run in ("a", "b"):
    train(TrainConfig(model="cnn", epochs=1, limit=1000, device="cuda", out="$WORK/seed/" + run, quiet=True), log=lambda _: None)
    sd.append(torch.load("$WORK/seed/" + run + "/cnn/checkpoint.pt", weights_only=True)["state_dict"])
diff = {k: (sd[0][k].float() - sd[1][k].float()).abs().max().item() for k in sd[0]}
print("identical:", all(v == 0 for v in diff.values()), "| largest difference", max(diff.values()))
EOF
    ' 2>&1 | tee "$OUT/cli-checks.log"
    echo "phase 2 exit code: ${PIPESTATUS[0]}"
}

cuda_machine_tests() {
    section "3 non-gpu tests of the unit-test files, on the CUDA machine"
    if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "no CUDA here: phase 3 skipped"
        return 0
    fi
    if [ "$(left)" -lt 40 ]; then
        echo "only $(left)s of the budget left: phase 3 skipped"
        return 0
    fi
    timeout -k 10 "$(cap 110)" python3 -m pytest -m "not gpu and not slow" -q -rfEs -p no:cacheprovider \
        --basetemp="$WORK/pt-cpu" tests/training/test_train.py tests/handlers/test_handler_loading.py 2>&1 \
        | tee "$OUT/cuda-machine-tests.log"
    echo "phase 3 exit code: ${PIPESTATUS[0]}"
}

main() {
    setup || return 1
    gpu_tests
    cli_checks
    cuda_machine_tests
    section "done"
    ls -la "$OUT"
}

[ "${BASH_SOURCE[0]}" = "$0" ] && main 2>&1 | tee "$OUT/check.log"
