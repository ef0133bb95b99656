#!/usr/bin/env bash
# Make Fashion-MNIST available offline: the Debian package when apt is usable; otherwise the
# framework falls back to torchvision's download the first time the data is needed.
set -u
dir=/usr/share/datasets/fashion-mnist
if ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
  if [ "$sudo" != none ]; then
    echo "installing Debian package dataset-fashion-mnist ..."
    ($sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || ($sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
      && exit 0
  fi
fi
echo "note: Fashion-MNIST not installed from Debian; it will be downloaded with torchvision on first use" >&2
exit 0
