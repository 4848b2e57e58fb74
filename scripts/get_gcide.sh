#!/usr/bin/env bash
# Fetch the GCIDE dictionary (Debian's dict-gcide, 15 MB .deb -> 40 MB of text) for the `gcide` LM corpus.
#
#   bash scripts/get_gcide.sh [DEST]
#
# DEST defaults to $RIVERVALLEY_GCIDE, else ~/.cache/rivervalley/gcide (where experiments/lm/data.py looks).
# Writes DEST/gcide.txt (the dictd data, decompressed) and DEST/copyright. Needs apt-get (with package lists:
# run `apt-get update` once as root if the download finds nothing) and dpkg-deb; no root needed otherwise.
set -euo pipefail

DEST="${1:-${RIVERVALLEY_GCIDE:-${XDG_CACHE_HOME:-$HOME/.cache}/rivervalley/gcide}}"
for tool in apt-get dpkg-deb gzip; do
    command -v "$tool" >/dev/null || { echo "get_gcide: $tool not found (needs a Debian/Ubuntu system)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download dict-gcide >"$work/apt.log" 2>&1); then
    tail -n 3 "$work/apt.log" >&2
    echo "get_gcide: 'apt-get download dict-gcide' failed; run 'apt-get update' (as root) and retry" >&2
    exit 1
fi
dpkg-deb -x "$work"/dict-gcide_*.deb "$work/x"
mkdir -p "$DEST"
# The .dict.dz is dictzip, which gzip reads. Write beside the target, then rename (atomic).
gzip -dc "$work/x/usr/share/dictd/gcide.dict.dz" >"$DEST/.gcide.txt.tmp"
mv "$DEST/.gcide.txt.tmp" "$DEST/gcide.txt"
cp "$work/x/usr/share/doc/dict-gcide/copyright" "$DEST/copyright"
echo "$DEST/gcide.txt ($(du -h "$DEST/gcide.txt" | cut -f1))"
