#!/usr/bin/env bash
# Build an aarch64 sysroot (Debian's arm64 Python 3.11 and the aarch64 wheels of TVM's runtime and
# numpy) so that tests can run ARM artifacts under qemu-user-static on this x86 machine.
# Usage: .ci/aarch64-sysroot.sh DEST   (needs root, apt-get and PyPI; about a minute)
set -euo pipefail
dest=${1:?usage: aarch64-sysroot.sh DEST}
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
dpkg --add-architecture arm64
apt-get update -qq
mkdir -p "$dest/debs" "$dest/root" "$dest/site"
chmod 777 "$dest/debs"
(cd "$dest/debs" && apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
    libpython3.11-stdlib:arm64 libc6:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 libssl3:arm64 \
    libgcc-s1:arm64 libstdc++6:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 \
    libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libcrypt1:arm64 libnsl2:arm64 libtirpc3:arm64)
for f in "$dest"/debs/*.deb; do dpkg -x "$f" "$dest/root"; done
python3 -m pip install --quiet --target "$dest/site" --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --only-binary=:all: "apache-tvm>=0.27,<0.28" "apache-tvm-ffi==0.1.14.post1" numpy ml_dtypes
qemu-aarch64-static -L "$dest/root" "$dest/root/usr/bin/python3.11" -c "import sys; sys.path.insert(0, '$dest/site'); import tvm; print('aarch64 sysroot ready:', tvm.__version__)"
