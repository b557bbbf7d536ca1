# Sourced by scripts/demo and scripts/test: a project virtual environment in .venv with the
# package installed editable. Idempotent and quiet when everything is already there.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
# The CPU build is enough for the reference engine; set TORCH_SPEC to choose another.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  # Debian packages, installed only when one of the named commands is missing.
  local missing=0
  for cmd in $1; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
  [ "$missing" = 0 ] && return 0
  echo "installing Debian packages: ${*:2}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${@:2}" >/dev/null
}

if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install "__no_such_command__" python3-venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
# pip's notes that are expected here: vLLM's and SGLang's pins are not met on purpose (--no-deps
# beside CPU torch), and --target over an existing directory.
PIP_NOISE='^WARNING: (Location|Target directory|Skipping)|requires .* which is (incompatible|not installed)|but you have .* which is incompatible|dependency (conflicts|resolver does not currently)|^(vllm|sglang) [0-9.]* requires|not installed'

run_quietly() {
  # Runs a command, shows its output less PIP_NOISE; on failure shows all of it, the free disk
  # (a full disk is the usual cause on CI) and fails, instead of letting a pipe hide the status.
  local out status=0
  out=$(mktemp)
  "$@" >"$out" 2>&1 || status=$?
  if [ "$status" = 0 ]; then
    grep -Ev "$PIP_NOISE" "$out" || true
  else
    cat "$out" >&2
    echo "failed ($status): $*" >&2
    df -h "$ROOT" "${TMPDIR:-/tmp}" >&2 || true
  fi
  rm -f "$out"
  return "$status"
}
pip_quiet() { run_quietly "$VENV_PY" -m pip install -q --disable-pip-version-check "$@"; }

prune_cuda_binaries() {
  # A vLLM wheel carries ~700 MB of CUDA kernels and the vllm-rs tool, none of which can load
  # without libcuda; the tests use vLLM's Python block pool. Five copies would fill a CI disk.
  local dir=$1
  find "$dir" -path '*/vllm/*' \( -name '*.so' -o -name vllm-rs \) -type f -delete
  find "$dir" -path '*/vllm/third_party/*' -type d -name include -prune -exec rm -rf {} +
}

bootstrap_python() {
  # $1: extras to install, e.g. "engine" or "engine,dev".
  local stamp=".venv/.installed-$1"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV_PY" -c 'import torch' >/dev/null 2>&1 || pip_quiet "$TORCH_SPEC"
    pip_quiet -e ".[$1]"
    "$VENV_PY" -c 'import exporter, engine_shim' || { echo "install failed" >&2; exit 1; }
    touch "$stamp"
  fi
}

VLLM_MATRIX="tests/vllm/matrix.txt"
# SGLang's classes (its KV events), --no-deps in .venv-vllm/sglang: tests/engine_classes.
SGLANG_RELEASE=0.5.23
vllm_releases() { grep -v '^#' "$VLLM_MATRIX" | awk 'NF {print $1}'; }

bootstrap_vllm() {
  # The adapter tests' environment: CPU torch and the pure-Python packages vLLM's imports need,
  # in its own venv (vLLM's pins must not touch .venv); then every release of the support
  # matrix --no-deps in .venv-vllm/matrix/RELEASE (put first on PYTHONPATH to test it), the
  # newest also in the venv itself (for the benchmarks); SGLang's classes in .venv-vllm/sglang.
  # No pip cache: each wheel is installed once, and the cache would double the disk used.
  local stamp=".venv-vllm/.installed"
  if [ ! -f "$stamp" ] || [ tests/vllm/requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
      || [ "$VLLM_MATRIX" -nt "$stamp" ]; then
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    local vpip=(.venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir)
    local newest; newest=$(vllm_releases | tail -1)
    run_quietly "${vpip[@]}" "$TORCH_SPEC"
    run_quietly "${vpip[@]}" -r tests/vllm/requirements.txt
    run_quietly "${vpip[@]}" --no-deps "vllm==$newest"
    prune_cuda_binaries .venv-vllm/lib
    run_quietly "${vpip[@]}" --no-deps -e .
    local release
    for release in $(vllm_releases); do
      if [ ! -f ".venv-vllm/matrix/$release/.installed" ]; then
        rm -rf ".venv-vllm/matrix/$release"
        run_quietly "${vpip[@]}" --no-deps --target ".venv-vllm/matrix/$release" "vllm==$release" \
          || { echo "vLLM $release did not install" >&2; exit 1; }
        prune_cuda_binaries ".venv-vllm/matrix/$release"
        touch ".venv-vllm/matrix/$release/.installed"
      fi
      PYTHONPATH=".venv-vllm/matrix/$release" .venv-vllm/bin/python -c \
        "import vllm, vllm.v1.core.kv_cache_manager, engine_shim; assert vllm.__version__ == '$release', vllm.__version__" \
        || { echo "vLLM $release test environment is broken" >&2; exit 1; }
    done
    if [ ! -f ".venv-vllm/sglang/.installed-$SGLANG_RELEASE" ]; then
      rm -rf .venv-vllm/sglang
      run_quietly "${vpip[@]}" --no-deps --target .venv-vllm/sglang "sglang==$SGLANG_RELEASE"
      touch ".venv-vllm/sglang/.installed-$SGLANG_RELEASE"
    fi
    PYTHONPATH=.venv-vllm/sglang .venv-vllm/bin/python -c \
      "import sglang.srt.disaggregation.kv_events" \
      || { echo "SGLang $SGLANG_RELEASE test environment is broken" >&2; exit 1; }
    touch "$stamp"
  fi
}

bootstrap_vllm_live() {
  # A live vLLM engine (the CPU build, vLLM 0.32) for tests/vllm_live, in its own venv.
  local stamp=".venv-vllm-live/.installed"
  if [ ! -f "$stamp" ] || [ tests/vllm_live/requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x .venv-vllm-live/bin/python ] || "$PY" -m venv .venv-vllm-live
    local lpip=(.venv-vllm-live/bin/python -m pip)
    run_quietly "${lpip[@]}" install -q --disable-pip-version-check --no-cache-dir -r tests/vllm_live/requirements.txt
    run_quietly "${lpip[@]}" uninstall -q -y torchvision torchaudio torchcodec
    run_quietly "${lpip[@]}" install -q --disable-pip-version-check --no-deps -e .
    .venv-vllm-live/bin/python -c 'import vllm.entrypoints.openai.api_server, transformers, engine_shim' \
      || { echo "live vLLM test environment is broken" >&2; exit 1; }
    touch "$stamp"
  fi
}

bootstrap_node() {
  # Offline schema checks (Grafana's published dashboard schema, the Prometheus operator's CRD
  # schemas) from the npm registry, pinned by tests/node/package-lock.json.
  command -v npm >/dev/null 2>&1 || apt_install npm nodejs npm
  local stamp="tests/node/node_modules/.installed"
  if [ ! -f "$stamp" ] || [ tests/node/package-lock.json -nt "$stamp" ]; then
    npm ci --prefix tests/node --no-audit --no-fund --loglevel=error >/dev/null
    touch "$stamp"
  fi
}
