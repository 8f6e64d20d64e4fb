#!/usr/bin/env bash
# The device-side test subset (pytest -m device) on emulated 64-bit ARM, plus a
# cross-architecture check of one training step (tools/cross_arch.py).
#
# The boards are a Raspberry Pi Zero 2 W / Pi 3 (Cortex-A53, aarch64). This script runs
# an aarch64 Python 3.11 under qemu-user (QEMU_CPU=cortex-a53) with no binfmt_misc and no
# change to the host's dpkg architectures:
#   1. qemu-user-static from apt, if qemu-aarch64-static is missing;
#   2. a sysroot of Debian's arm64 python3.11 and its libraries, downloaded by apt-get
#      with a private state folder and unpacked with dpkg-deb -x, plus a proc/cpuinfo
#      of four Cortex-A53 cores (qemu -L serves it as the guest's /proc/cpuinfo; with
#      the host's x86 cpuinfo, `import onnxruntime` segfaults under QEMU 7.2);
#   3. the aarch64 wheels of the runtime dependencies + pytest + hypothesis, pinned to
#      the versions in the host venv, installed with the host pip into a site folder;
#   4. byte-compiles the sysroot's stdlib and the site folder once (Debian ships no .pyc;
#      imports would take seconds each under emulation);
#   5. NUMBA_CACHE_DIR in the cache, so the kernels (each compiled at its first call, about
#      5 minutes for all of them under emulation) are compiled once; the project is
#      staged as copies rewritten only when their bytes change, since Numba's cache
#      keys on the sources' mtimes (a fresh clone would invalidate symlinked ones);
#   6. runs `pytest -m device` under emulation;
#   7. dumps one training step on the host and under emulation and compares them.
# Everything is cached in ${SFPP_AARCH64_CACHE:-$HOME/.cache/sparsefedpp-aarch64}, each
# part under a stamp keyed by a hash of what it was built from. Needs the host venv
# (.venv, as .ci/run makes it; or SFPP_HOST_PYTHON). Prints timings; exits non-zero on
# any failure.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${SFPP_AARCH64_CACHE:-$HOME/.cache/sparsefedpp-aarch64}"
HOST_PY="${SFPP_HOST_PYTHON:-$REPO/.venv/bin/python}"
SYSROOT="$CACHE/sysroot"
SITE="$CACHE/site"
PKG="$CACHE/pkg"            # the project staged as the package sparsefedpp
OUT="$CACHE/out"            # the last run's cross-arch dumps
NUMBA_CACHE="$CACHE/numba"  # the guest's NUMBA_CACHE_DIR (the host keeps its own)
export QEMU_CPU=cortex-a53  # not "max": numpy then prints spurious FP warnings
VERSION=1                   # bump to rebuild every cached part

# The roots of the sysroot; apt adds their dependency closure (about 40 packages).
ROOT_PACKAGES=(python3.11-minimal libpython3.11-stdlib libgomp1 libstdc++6)
# The wheels; their versions come from the host venv.
WHEELS=(numpy numba llvmlite onnx onnxruntime paho-mqtt pytest hypothesis)
PLATFORM_ARGS=(--only-binary=:all: --implementation cp --python-version 3.11
               --abi cp311 --abi abi3 --abi none
               --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
               --platform manylinux_2_28_aarch64)

say() { printf '[aarch64] %s\n' "$*"; }
die() { printf '[aarch64] error: %s\n' "$*" >&2; exit 1; }
hash_of() { sha256sum | cut -c1-16; }

TIMINGS=()
STEP=""      # the step under way, and when it started
STEP_START=0
elapsed() {  # elapsed LABEL: one line of the timing table, since STEP_START
    local ms=$(( ($(date +%s%N) - STEP_START) / 1000000 ))
    printf '%-18s %6d.%01d s' "$1" $((ms / 1000)) $((ms % 1000 / 100))
}
timed() {  # timed LABEL COMMAND...: run, remember how long it took
    STEP="$1"
    STEP_START=$(date +%s%N)
    shift
    "$@"
    TIMINGS+=("$(elapsed "$STEP")")
    STEP=""
}
report() {
    local rc=$?
    [ -z "$STEP" ] || TIMINGS+=("$(elapsed "$STEP")  (failed)")
    if [ ${#TIMINGS[@]} -gt 0 ]; then
        say "timings:"
        printf '  %s\n' "${TIMINGS[@]}"
    fi
    if [ $rc -eq 0 ]; then say "OK"; else say "FAILED (exit $rc)"; fi
}
trap report EXIT

# Runs the aarch64 Python, with GUEST_ENV (env arguments: -u NAME..., then NAME=VALUE...)
# of the caller. The host's OpenBLAS settings name x86 cores: not for the guest.
GUEST_ENV=()
guest_python() {
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "${GUEST_ENV[@]}" \
        qemu-aarch64-static -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "$@"
}

# ------------------------------------------------------------------------ 1. qemu
install_qemu() {
    command -v qemu-aarch64-static >/dev/null 2>&1 && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing qemu-user-static"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-user-static \
        || { $sudo apt-get update -qq &&
             DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-user-static; }
    command -v qemu-aarch64-static >/dev/null 2>&1 || die "qemu-aarch64-static not found"
}

# ---------------------------------------------------------------------- 2. sysroot
# The host's Debian sources (not third-party ones, which may lack arm64 or be offline).
debian_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
             /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && grep -qiE 'debian\.org|debian-archive-keyring' "$f" && echo "$f"
    done
    return 0
}

cpuinfo() {  # what a Raspberry Pi 3's 64-bit kernel shows: four Cortex-A53 (part 0xd03)
    local i
    for i in 0 1 2 3; do
        printf 'processor\t: %d\nBogoMIPS\t: 38.40\n' "$i"
        printf 'Features\t: fp asimd evtstrm crc32 cpuid\n'
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
        printf 'CPU part\t: 0xd03\nCPU revision\t: 4\n\n'
    done
    printf 'Hardware\t: BCM2835\nRevision\t: a02082\n'
    printf 'Model\t\t: Raspberry Pi 3 Model B Rev 1.2\n'
}

build_sysroot() {
    local key stamp="$SYSROOT/.stamp"
    key=$( { echo "v$VERSION ${ROOT_PACKAGES[*]}"; cpuinfo; } | hash_of)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        say "sysroot: cached ($SYSROOT)"
        return 0
    fi
    say "sysroot: building ($SYSROOT)"
    local apt="$CACHE/apt" tmp="$SYSROOT.tmp" sources
    rm -rf "$apt" "$tmp"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/sources" \
             "$apt/preferences" "$apt/debs" "$tmp"
    : > "$apt/status"
    mapfile -t sources < <(debian_sources)
    [ ${#sources[@]} -gt 0 ] || die "no Debian apt sources found in /etc/apt"
    cp "${sources[@]}" "$apt/sources/"
    # A private apt: its own lists, cache and (empty) dpkg status, arm64 only. The
    # host's dpkg architectures and package lists are left alone.
    local opts=(-o "Dir::State=$apt" -o "Dir::State::Lists=$apt/lists"
                -o "Dir::State::status=$apt/status" -o "Dir::Cache=$apt/cache"
                -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt/sources"
                -o "Dir::Etc::Preferences=/dev/null"
                -o "Dir::Etc::PreferencesParts=$apt/preferences"
                -o APT::Architecture=arm64 -o APT::Architectures::=arm64
                -o APT::Install-Recommends=0 -o APT::Install-Suggests=0
                -o Debug::NoLocking=1 -o "APT::Sandbox::User=$(id -un)")
    apt-get "${opts[@]}" -qq update
    # The dependency closure, as apt would install it into an empty system.
    local pkgs
    mapfile -t pkgs < <(apt-get "${opts[@]}" -s install "${ROOT_PACKAGES[@]}" |
                        awk '$1 == "Inst" {print $2}')
    [ ${#pkgs[@]} -gt 0 ] || die "apt found no arm64 packages for ${ROOT_PACKAGES[*]}"
    (cd "$apt/debs" && apt-get "${opts[@]}" -qq download "${pkgs[@]}")
    local deb
    for deb in "$apt/debs"/*.deb; do
        dpkg-deb -x "$deb" "$tmp"
    done
    # Absolute symlinks would lead the host kernel out of the sysroot (e.g. the
    # stdlib's sitecustomize.py -> /etc/python3.11/...): make them relative.
    local link target
    while IFS= read -r -d '' link; do
        target=$(readlink "$link")
        ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$tmp$target")" "$link"
    done < <(find "$tmp" -type l -lname '/*' -print0)
    mkdir -p "$tmp/proc"
    cpuinfo > "$tmp/proc/cpuinfo"
    say "sysroot: ${#pkgs[@]} packages, $(du -sm "$apt/debs" | cut -f1) MB downloaded," \
        "$(du -sm "$tmp" | cut -f1) MB unpacked"
    rm -rf "$SYSROOT" "$apt"
    mv "$tmp" "$SYSROOT"
    # Fail here, not in the tests, if a library is missing.
    guest_python -c 'import bz2, ctypes, decimal, lzma, sqlite3, ssl, uuid, zlib' ||
        die "the aarch64 python cannot import its stdlib"
    echo "$key" > "$stamp"
}

# ------------------------------------------------------------------------ 3. wheels
host_pins() {  # name==version of the host venv, as a pip constraints file
    local freeze
    freeze=$("$HOST_PY" -m pip freeze --exclude-editable) ||
        die "$HOST_PY -m pip freeze failed"
    grep -E '^[A-Za-z0-9._-]+==' <<<"$freeze" |
        grep -viE '^(torch|torchvision|torchaudio)==' || true
}

install_wheels() {
    local pins key stamp="$SITE/.stamp"
    pins=$(host_pins) || exit 1
    for w in "${WHEELS[@]}"; do
        grep -qiE "^${w//-/[-_]}==" <<<"$pins" || die "$w is not installed in $HOST_PY"
    done
    key=$( { echo "v$VERSION ${WHEELS[*]} ${PLATFORM_ARGS[*]}"; echo "$pins"; } | hash_of)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        say "wheels: cached ($SITE)"
        return 0
    fi
    say "wheels: installing aarch64 wheels into $SITE"
    local tmp="$SITE.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    echo "$pins" > "$CACHE/constraints.txt"
    "$HOST_PY" -m pip install -q --no-warn-script-location --target "$tmp" \
        "${PLATFORM_ARGS[@]}" -c "$CACHE/constraints.txt" "${WHEELS[@]}"
    rm -rf "$SITE"
    mv "$tmp" "$SITE"
    for w in "${WHEELS[@]}"; do
        grep -iE "^${w//-/[-_]}==" <<<"$pins"
    done | tr '\n' ' ' | sed 's/^/[aarch64] wheels: /; s/$/\n/'
    echo "$key" > "$stamp"
}

# ----------------------------------------------------------------------- 4. compile
compile_all() {
    local key stamp="$CACHE/.compiled"
    key=$(cat "$SYSROOT/.stamp" "$SITE/.stamp" | hash_of)
    # The project's own files change from run to run: compileall skips unchanged ones.
    "$HOST_PY" "$REPO/tools/cross_arch.py" stage "$REPO" "$PKG"
    local dirs=("$PKG")
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ]; then
        dirs+=("$SYSROOT/usr/lib/python3.11" "$SITE")
        say "compile: stdlib, site and project, under emulation"
    else
        say "compile: stdlib and site cached; project"
    fi
    # -j0: one worker per core. PYTHONDONTWRITEBYTECODE would make it a no-op.
    local GUEST_ENV=(-u PYTHONDONTWRITEBYTECODE)
    if ! guest_python -m compileall -q -j0 "${dirs[@]}" >"$CACHE/compileall.log" 2>&1
    then
        tail -20 "$CACHE/compileall.log" >&2
        die "compileall failed (log: $CACHE/compileall.log)"
    fi
    echo "$key" > "$stamp"
}

# ------------------------------------------------------------------- 6. the tests
# CI is unset for the guest: the extras (torch) are not installed there, so the conftest
# rule that turns an importorskip into a failure under CI=true does not apply.
# SFPP_EMULATED=1 picks the emulated hypothesis profile (tests/conftest.py).
TEST_ENV=(-u CI SFPP_EMULATED=1 "PYTHONPATH=$PKG:$SITE" "NUMBA_CACHE_DIR=$NUMBA_CACHE")

run_tests() {
    local GUEST_ENV=("${TEST_ENV[@]}")
    (cd "$REPO" && guest_python -m pytest -q -m device -p no:cacheprovider \
        --ignore=tests/conformance tests)  # torch has no place on the device
}

# -------------------------------------------------------------- 7. cross-arch
cross_arch() {
    rm -rf "$OUT"
    mkdir -p "$OUT"
    (cd "$OUT" && "$HOST_PY" -m sparsefedpp.tools.cross_arch dump "$OUT/host.npz")
    local GUEST_ENV=("${TEST_ENV[@]}")
    (cd "$OUT" && guest_python -m sparsefedpp.tools.cross_arch dump "$OUT/aarch64.npz")
    "$HOST_PY" -m sparsefedpp.tools.cross_arch compare "$OUT/host.npz" "$OUT/aarch64.npz"
}

# --------------------------------------------------------------------------- main
main() {
    [ -x "$HOST_PY" ] || die "no host python at $HOST_PY (make the venv first, as .ci/run does)"
    local tool
    for tool in apt-get dpkg-deb flock sha256sum realpath; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
    done
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"  # one run at a time per cache
    flock -w 3600 9 || die "another run holds $CACHE/.lock"

    timed "qemu" install_qemu
    timed "sysroot build" build_sysroot
    timed "wheel install" install_wheels
    timed "compile" compile_all
    timed "tests (emulated)" run_tests
    timed "cross-arch check" cross_arch
}

# One call, so bash has read the whole file before anything runs (an edit of this file
# during a run cannot change what the run does).
main "$@"
