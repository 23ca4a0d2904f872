#!/usr/bin/env bash
# Set up Kiln on a fresh Debian/Ubuntu machine: host tools (apt), a venv, Kiln.
# Idempotent; run as root or with sudo available. Used by the README and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

# Host tools Kiln drives. Keep in sync with docs/build-notes.md and Containerfile.
APT_PACKAGES=(
  python3 python3-venv python3-dev git ca-certificates curl
  podman buildah runc skopeo umoci uidmap fuse-overlayfs mmdebstrap
  qemu-system-x86 qemu-utils ovmf systemd-boot-efi
  erofs-utils squashfs-tools dosfstools mtools fdisk e2fsprogs fsverity
  docker-registry gnupg openssh-client openssl
  # The fleet tests: a real PostgreSQL server and headless Chromium for the fleet page (not in Containerfile).
  postgresql chromium
  # A TPM for VMs (`kiln vm run --tpm`) and for the identity tests: swtpm, and tpm2-tools to talk to it.
  swtpm tpm2-tools
  # Verified boot: sbsign/sbverify sign and check systemd-boot and the UKIs with the Secure Boot db key;
  # faketime freezes the clock sbsign writes into the signature, so a rebuild gives the same bytes.
  sbsigntool faketime
  # arm64 classes: built through qemu-user (binfmt_misc, registered below), booted in qemu-system-aarch64
  # with AAVMF (docs/arm64.md).
  qemu-user-static binfmt-support arch-test qemu-system-arm qemu-efi-aarch64
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: run as root or install sudo" >&2; exit 1; }
  sudo_cmd=(sudo)
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Foreign architectures: qemu-user runs arm64 binaries in chroots and containers (the F flag), once
# binfmt_misc is mounted and qemu-aarch64 registered. Where that is impossible (a container without
# binfmt_misc, no privileges), x86_64 classes still build and arm64 builds refuse before any work.
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/status" ]; then
  "${sudo_cmd[@]}" mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null \
    || echo "setup: warning: cannot mount binfmt_misc at $binfmt: arm64 classes will not build here" >&2
fi
if [ -e "$binfmt/status" ] && [ "$(uname -m)" != aarch64 ] && [ ! -e "$binfmt/qemu-aarch64" ]; then
  "${sudo_cmd[@]}" update-binfmts --enable qemu-aarch64 2>/dev/null \
    || echo "setup: warning: cannot register qemu-aarch64 with binfmt_misc: arm64 classes will not build here" >&2
fi
if [ -e "$binfmt/qemu-aarch64" ]; then
  arch-test arm64 >/dev/null 2>&1 || echo "setup: warning: arch-test arm64 fails: arm64 binaries do not run here" >&2
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "setup: done; kiln is .venv/bin/kiln"
