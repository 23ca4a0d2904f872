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

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "setup: done; kiln is .venv/bin/kiln"
