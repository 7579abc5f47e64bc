#!/usr/bin/env bash
# The torch-free device runtime on an arm64 userland under emulation, compared with the same run on x86.
#
#   PYTHONPATH=$PWD scripts/arm64_check.sh --bundle runs/phantom/bundle --bundle runs/phantom/qat/NAME/bundle \
#       --split runs/phantom/split.json --real /work/shared/data/usgra-seg/images
#
# What it does, each step skipped when a marker in the cache says it is done (docs/arm64.md):
#   1. host tools: Debian's qemu-user-static, binfmt-support and debootstrap (apt-get), binfmt_misc mounted and
#      qemu-aarch64 registered;
#   2. an arm64 Debian root file system (debootstrap --foreign, then the second stage under qemu) with
#      python3 and python3-venv, and a venv in it holding the aarch64 wheels of numpy, opencv-python-headless,
#      onnxruntime and tifffile from PyPI, pinned to the versions of the x86 Python that runs this script;
#   3. the runtime as one file (`nerveseg-device build-pyz`), the bundles and the frames copied in;
#   4. for each bundle and each ONNX file in it (FP32, INT8): `nerveseg-device.pyz run --masks --jsonl` and the
#      probability probe (scripts/arm64_agreement.py probe) inside the chroot, the same on x86;
#   5. scripts/arm64_agreement.py compare: per-frame mask Dice arm64 vs x86 and max / mean |dp|.
# Root only (debootstrap, chroot, mounts). Nothing is written inside the repository; the cache lives in
# $NERVESEG_ARM64_CACHE (default /work/.cache/nerveseg-arm64). Not part of CI.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${NERVESEG_ARM64_CACHE:-/work/.cache/nerveseg-arm64}
SUITE=${NERVESEG_ARM64_SUITE:-bookworm}
MIRROR=${NERVESEG_ARM64_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-/work/venv/bin/python}  # the x86 Python with the project's dependencies
# The CPU qemu emulates decides which ONNX Runtime kernels run (MLAS picks them by the CPU's features): qemu's
# default "max" has SVE, i8mm and more that a Jetson lacks; Cortex-A76 (ARMv8.2-A, dotprod, fp16) is the
# nearest qemu offers to Orin's Cortex-A78AE. `qemu-aarch64-static -cpu help` lists the others.
QEMU_CPU=${NERVESEG_ARM64_CPU:-cortex-a76}
ROOTFS=$CACHE/rootfs
GUEST=/nerveseg               # the work folder as the chroot sees it
WORK=$ROOTFS$GUEST            # ... and as the host sees it
GUEST_PY=/opt/venv/bin/python
BUNDLES=() FRAME_SETS=() SPLIT="" REAL_DIR="" REAL_COUNT=16 MAX_FRAMES=12 THREADS=1 ONLY=all

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --bundle DIR      a bundle folder (repeat); every .onnx file in its manifest is run
  --split FILE      a run's split.json: the first --max-frames of its test split
  --frames DIR      a folder of frames (repeat; *_mask.* files left out); the first --max-frames, sorted by name
  --real DIR        a folder of real frames; --real-count of them, spread over the sorted list, copied to the cache
  --real-count N    (default 16)
  --max-frames N    frames of --split and of each --frames folder (default 12; emulation is slow)
  --threads N       ONNX Runtime threads on both sides (default 1)
  --only fp32|int8  run only the bundles' files of this precision (default: all of them)
EOF
}

die() { echo "arm64_check: $*" >&2; exit 1; }
log() { echo "[arm64_check $(date +%H:%M:%S)] $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --bundle) BUNDLES+=("$(realpath "$2")"); shift 2 ;;
        --frames) FRAME_SETS+=("$(realpath "$2")"); shift 2 ;;
        --split) SPLIT=$(realpath "$2"); shift 2 ;;
        --real) REAL_DIR=$(realpath "$2"); shift 2 ;;
        --real-count) REAL_COUNT=$2; shift 2 ;;
        --max-frames) MAX_FRAMES=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts)"
[ ${#BUNDLES[@]} -gt 0 ] || die "give at least one --bundle"
[ ${#FRAME_SETS[@]} -gt 0 ] || [ -n "$SPLIT$REAL_DIR" ] || die "give --split, --frames or --real"
[ -z "$SPLIT" ] || [ -f "$SPLIT" ] || die "$SPLIT: no such file"
case $ONLY in all|fp32|int8) ;; *) die "--only $ONLY: give fp32 or int8" ;; esac
for b in "${BUNDLES[@]}"; do [ -f "$b/manifest.json" ] || die "$b: no manifest.json (not a bundle folder)"; done
for f in "${FRAME_SETS[@]}" ${REAL_DIR:+"$REAL_DIR"}; do [ -d "$f" ] || die "$f: not a folder"; done
case $CACHE in
    "$REPO"|"$REPO"/*) die "NERVESEG_ARM64_CACHE=$CACHE is inside the repository; put it outside" ;;
esac
"$PYTHON" -c 'import device_runtime' 2>/dev/null || die "$PYTHON cannot import device_runtime (set PYTHONPATH)"
mkdir -p "$CACHE"

# --- 1. host tools ----------------------------------------------------------------------------------------
host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # In a container binfmt_misc is often not mounted; qemu-user-static's registration needs it.
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
    fi
    # F (fix binary): the kernel opened the interpreter at registration, so the chroot needs no copy of qemu
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || die "qemu-aarch64 is registered without the F flag; a chroot could not find the interpreter"
}

# --- mounts for the chroot, undone on every exit ----------------------------------------------------------
MOUNTED=()
mount_guest() {
    local m
    # No /sys: the host's x86 sysfs makes ONNX Runtime's CPU detection (pytorch cpuinfo, aarch64 build) crash
    # at import (SIGSEGV under qemu); without it cpuinfo fails cleanly and the kernels follow qemu's AT_HWCAP.
    for m in proc dev dev/pts; do
        mountpoint -q "$ROOTFS/$m" && continue
        mkdir -p "$ROOTFS/$m"
        case $m in
            proc) mount -t proc proc "$ROOTFS/proc" ;;
            dev) mount --bind /dev "$ROOTFS/dev" ;;
            dev/pts) mount --bind /dev/pts "$ROOTFS/dev/pts" ;;
        esac
        MOUNTED=("$ROOTFS/$m" "${MOUNTED[@]}")
    done
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"  # pip inside reaches PyPI through the host's resolver
}
unmount_guest() {
    local m
    for m in "${MOUNTED[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
    MOUNTED=()
}
trap unmount_guest EXIT
in_guest() {
    QEMU_CPU=$QEMU_CPU chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 "$@"
}

# --- 2. root file system and venv -------------------------------------------------------------------------
rootfs() {
    if [ ! -e "$CACHE/.stage1-done" ]; then
        log "debootstrap --foreign --arch=arm64 $SUITE (downloads from $MIRROR)"
        # a run killed outright leaves its bind mounts: removing the tree then would remove the host's /dev
        ! grep -q " $ROOTFS/" /proc/mounts || die "something is still mounted under $ROOTFS; unmount it first"
        rm -rf "$ROOTFS"
        debootstrap --foreign --arch=arm64 --variant=minbase \
            --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/stage1.log" 2>&1 \
            || die "debootstrap first stage failed: see $CACHE/stage1.log"
        touch "$CACHE/.stage1-done"
    fi
    if [ ! -e "$CACHE/.stage2-done" ]; then
        log "debootstrap second stage under qemu (slow: every package's scripts run emulated)"
        chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >"$CACHE/stage2.log" 2>&1 \
            || die "debootstrap second stage failed: see $CACHE/stage2.log (delete $CACHE to start afresh)"
        touch "$CACHE/.stage2-done"
    fi
    [ "$(in_guest uname -m)" = aarch64 ] || die "the chroot does not run as aarch64"
}

host_versions() {
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
print(" ".join(f"{name}=={md.version(name)}" for name in
               ("numpy", "opencv-python-headless", "onnxruntime", "tifffile")))
EOF
}

guest_venv() {
    local pins
    pins=$(host_versions)
    [ "$(cat "$CACHE/.venv-done" 2>/dev/null)" = "$pins" ] && return
    mount_guest
    if [ ! -x "$ROOTFS/opt/venv/bin/python" ]; then  # ensurepip under emulation takes minutes: made once
        log "python3 -m venv in the chroot"
        rm -rf "$ROOTFS/opt/venv.partial"
        in_guest python3 -m venv /opt/venv.partial
        mv "$ROOTFS/opt/venv.partial" "$ROOTFS/opt/venv"
    fi
    # The host's CA bundle: where TLS to PyPI passes through a proxy with its own CA, only the host trusts it
    cp -L "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" \
        "$ROOTFS/etc/ssl/certs/host-ca-bundle.crt"
    log "pip install $pins in the chroot (aarch64 wheels from PyPI)"
    # --only-binary: a wheel or nothing (building OpenCV under emulation would take hours)
    in_guest "$GUEST_PY" -m pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: \
        --cert /etc/ssl/certs/host-ca-bundle.crt $pins >"$CACHE/pip.log" 2>&1 \
        || die "pip install in the chroot failed: see $CACHE/pip.log"
    echo "$pins" >"$CACHE/.venv-done"
}

# --- 3. runtime, bundles, frames --------------------------------------------------------------------------
stage_inputs() {
    rm -rf "$WORK/bundles" "$WORK/out" "$WORK/frames"
    mkdir -p "$WORK/bundles" "$WORK/frames" "$WORK/out"
    "$PYTHON" -m device_runtime build-pyz --out "$WORK/nerveseg-device.pyz" >/dev/null
    cp "$REPO/scripts/arm64_agreement.py" "$WORK/"
    local i=0 b f
    for b in "${BUNDLES[@]}"; do
        cp -r "$b" "$WORK/bundles/b$i"
        echo "$b" >"$WORK/bundles/b$i.source"
        i=$((i + 1))
    done
    i=0
    for f in "${FRAME_SETS[@]}"; do
        mkdir -p "$WORK/frames/frames$i"
        find "$f" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.tif' -o -iname '*.tiff' -o -iname '*.jpg' \) \
            ! -iname '*_mask.*' | sort | head -n "$MAX_FRAMES" | xargs -r cp -t "$WORK/frames/frames$i"
        i=$((i + 1))
    done
    if [ -n "$SPLIT" ]; then
        mkdir -p "$WORK/frames/test"
        "$PYTHON" - "$SPLIT" "$MAX_FRAMES" <<'EOF' | xargs -r -d '\n' cp -t "$WORK/frames/test"
import json, pathlib, sys
split = json.loads(pathlib.Path(sys.argv[1]).read_text())
for item in split["test"][:int(sys.argv[2])]:
    print(pathlib.Path(split["root"]) / item["image"])
EOF
    fi
    if [ -n "$REAL_DIR" ]; then  # spread over the sorted list, so that the sizes and regions vary
        mkdir -p "$WORK/frames/real"
        find "$REAL_DIR" -maxdepth 1 -type f -iname '*.png' | sort \
            | awk -v n="$REAL_COUNT" '{a[NR] = $0}
                END {for (k = 0; k < n && k < NR; k++) print a[int(k * NR / n) + 1]}' \
            | xargs -r cp -t "$WORK/frames/real"
    fi
}

# --- 4. runs ----------------------------------------------------------------------------------------------
# run_side SIDE BASE COMMAND...: BASE is the work folder as COMMAND sees it (the chroot's or the host's), and
# COMMAND a Python with the single-file runtime on PYTHONPATH. Per bundle file and frame set: the probe (every
# ONNX file), and `nerveseg-device.pyz run` for the file that run picks for its precision on ONNX Runtime CPU.
run_side() {
    local side=$1 base=$2 bundle precision path how label set out host_out
    shift 2
    for bundle in $(cd "$WORK/bundles" && ls -d */ | tr -d /); do
        while read -r precision path how; do
            [ "$ONLY" = all ] || [ "$ONLY" = "$precision" ] || continue
            label=$(basename "$path" .onnx)
            for set in $(cd "$WORK/frames" && ls -d */ | tr -d /); do
                out=$base/out/$side/$bundle/$label/$set
                host_out=$WORK/out/$side/$bundle/$label/$set
                mkdir -p "$host_out"
                log "$side: bundle $bundle ($(cat "$WORK/bundles/$bundle.source")) $path on $set"
                "$@" "$base/arm64_agreement.py" probe --bundle "$base/bundles/$bundle" --model "$path" \
                    --threads "$THREADS" --source "$base/frames/$set" --out "$out/probe.npz" \
                    >"$host_out/probe.log" 2>&1 \
                    || die "$side probe failed: see $host_out/probe.log"
                [ "$how" = run ] || continue
                "$@" "$base/nerveseg-device.pyz" run --bundle "$base/bundles/$bundle" --backend ort-cpu \
                    --precision "$precision" --threads "$THREADS" --source "$base/frames/$set" \
                    --masks "$out/run/masks" --jsonl "$out/run/frames.jsonl" \
                    --summary-json "$out/run/summary.json" \
                    --quiet >"$host_out/run.log" 2>&1 || die "$side run failed: see $host_out/run.log"
            done
        done < <("$PYTHON" "$REPO/scripts/arm64_agreement.py" files "$WORK/bundles/$bundle")
    done
}

START=$(date +%s)
host_tools
rootfs
guest_venv
mount_guest
stage_inputs
VERSIONS='import platform, numpy, cv2, onnxruntime as o
print(platform.machine(), "numpy", numpy.__version__, "cv2", cv2.__version__, "onnxruntime", o.__version__)'
# stderr to a file: under qemu ONNX Runtime's import prints cpuinfo's complaints (docs/arm64.md)
log "arm64 side (qemu -cpu $QEMU_CPU): $(in_guest "$GUEST_PY" -c "$VERSIONS" 2>"$CACHE/guest-import.log")"
T0=$(date +%s)
run_side arm64 "$GUEST" in_guest env PYTHONPATH="$GUEST/nerveseg-device.pyz" "$GUEST_PY"
T1=$(date +%s)
run_side x86 "$WORK" env PYTHONPATH="$WORK/nerveseg-device.pyz" "$PYTHON"
T2=$(date +%s)
"$PYTHON" "$REPO/scripts/arm64_agreement.py" compare --work "$WORK" --json "$CACHE/agreement-$QEMU_CPU.json"
log "setup $((T0 - START)) s, arm64 runs $((T1 - T0)) s, x86 runs $((T2 - T1)) s, total $(($(date +%s) - START)) s"
