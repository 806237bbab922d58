#!/usr/bin/env bash
# Builds tests/vcsim/main.go (govmomi's simulator behind our own main) into
# OUTDIR/vcsim, offline: Debian's Go (golang-go) in GOPATH mode over the
# sources of golang-github-vmware-govmomi-dev in /usr/share/gocode. No
# module proxy, no network. The build cache lives under OUTDIR.
#   tests/vcsim/build.sh OUTDIR
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
out="$1"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
gopath=/usr/share/gocode
if ! command -v go >/dev/null 2>&1; then
  echo "go is missing: apt-get install golang-go" >&2
  exit 3
fi
if [ ! -d "$gopath/src/github.com/vmware/govmomi/simulator" ]; then
  echo "$gopath/src/github.com/vmware/govmomi/simulator is missing: apt-get install golang-github-vmware-govmomi-dev" >&2
  exit 3
fi
# GOPATH mode wants the main package inside a GOPATH-less directory of its
# own: copy it there, so that nothing is written into the source tree.
src="$out/src/cbtvault-vcsim"
mkdir -p "$src"
cp "$here/main.go" "$src/main.go"
cd "$src"
env GO111MODULE=off GOPATH="$gopath" GOPROXY=off GOTOOLCHAIN=local \
  GOCACHE="$out/gocache" CGO_ENABLED=0 \
  go build -o "$out/vcsim.tmp.$$" .
# Atomic: a concurrent build or a running test never sees half a binary.
mv "$out/vcsim.tmp.$$" "$out/vcsim"
