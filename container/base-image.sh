#!/usr/bin/env bash
# Make a Debian bookworm base image locally, for hosts that reach no container registry:
# debootstrap --variant=minbase from the Debian mirror this host's apt uses, then podman import.
# The root filesystem tarball is cached outside the checkout and reused.
#   container/base-image.sh [IMAGE]     (default IMAGE: localhost/debian:bookworm)
set -euo pipefail
IMAGE=${1:-localhost/debian:bookworm}
SUITE=bookworm
CACHE=${OLLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ollama-server}/images
TARBALL=$CACHE/debian-$SUITE-minbase.tar

if podman image exists "$IMAGE"; then
  echo "$IMAGE is there"
  exit 0
fi

# The mirror apt already uses here (deb822 .sources files first, then sources.list).
mirror() {
  local uri
  uri=$(awk -v s="$SUITE" 'BEGIN{IGNORECASE=1}
        /^URIs:/ {u=$2} /^Suites:/ {for (i=2;i<=NF;i++) if ($i==s) {print u; exit}}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk -v s="$SUITE" '$1=="deb" && $3==s {print $2; exit}' /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: make container-tools" >&2; exit 1; }
  MIRROR=$(mirror)
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/debootstrap.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  echo "debootstrap --variant=minbase $SUITE from $MIRROR (about a minute)"
  debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || {
    tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  mkdir -p "$CACHE"
  tar -C "$WORK/rootfs" -cf "$TARBALL.partial" .
  mv "$TARBALL.partial" "$TARBALL"
fi
podman import --change 'CMD ["/bin/bash"]' "$TARBALL" "$IMAGE" >/dev/null
echo "imported $IMAGE from $TARBALL"
