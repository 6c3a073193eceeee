#!/usr/bin/env bash
# Makes sure a usable CRIU (>= 4.2, passing `criu check`) is installed and that
# its source tree (needed for pycriu) is unpacked under $PHAUL_CACHE.
# Prints the path of the CRIU source tree on stdout.
# Never adds non-bookworm binary sources: it fetches only Debian's source
# tarball through a private, source-only apt configuration.
set -euo pipefail
shopt -s inherit_errexit

CACHE=${PHAUL_CACHE:-/var/cache/phaul}
TESTED_VERSION=4.2.1-1
MIN_VERSION=4.2
log() { echo "setup: $*" >&2; }

criu_version() {  # prints "X.Y[.Z]" of the criu on PATH, or nothing
    command -v criu >/dev/null || return 0
    criu --version 2>/dev/null | awk '/^Version:/ {print $2}'
}

version_ok() {  # version_ok HAVE WANT: HAVE >= WANT
    [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]
}

criu_usable() {
    local v; v=$(criu_version)
    version_ok "$v" "$MIN_VERSION" && criu check >/dev/null 2>&1
}

fetch_tarball() {  # downloads criu_4.2.x.orig.tar.xz into $CACHE/src, prints its path
    local uri apt_dir list opts
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    [ -n "$uri" ] || { log "cannot find a Debian mirror URI in /etc/apt/sources.list.d/debian.sources"; exit 1; }
    apt_dir=$CACHE/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$CACHE/src"
    list=$apt_dir/sources.list
    # testing and unstable carry CRIU 4.2; source entries only, never "deb" lines.
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$uri" testing "$uri" unstable > "$list"
    opts=(-o "Dir::Etc::SourceList=$list" -o Dir::Etc::SourceParts=/nonexistent
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    apt-get "${opts[@]}" -qq update >&2
    cd "$CACHE/src"
    if ! apt-get "${opts[@]}" -qq source --download-only --tar-only "criu=$TESTED_VERSION" >&2 2>/dev/null; then
        local newest
        newest=$(apt-cache "${opts[@]}" showsrc criu 2>/dev/null | awk '/^Version: 4\.2\./ {print $2}' | sort -V | tail -1)
        [ -n "$newest" ] || { log "Debian's sources offer no criu 4.2.x; install CRIU >= $MIN_VERSION by hand"; exit 1; }
        log "criu $TESTED_VERSION is gone from the pool, using $newest"
        apt-get "${opts[@]}" -qq source --download-only --tar-only "criu=$newest" >&2
    fi
    ls -1 "$CACHE"/src/criu_4.2*.orig.tar.xz | sort -V | tail -1
}

source_tree() {  # unpacks the newest cached tarball afresh if needed, prints the tree
    local tarball tree
    tarball=$(ls -1 "$CACHE"/src/criu_4.2*.orig.tar.xz 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$tarball" ] || tarball=$(fetch_tarball)
    tree=$CACHE/src/$(basename "$tarball" .orig.tar.xz | tr _ -)
    if [ ! -f "$tree/.phaul-unpacked" ]; then
        rm -rf "$tree" "$tree.tmp"; mkdir -p "$tree.tmp"
        tar -xJf "$tarball" -C "$tree.tmp" --strip-components=1
        mv "$tree.tmp" "$tree"; touch "$tree/.phaul-unpacked"
    fi
    echo "$tree"
}

tree=$(source_tree)
if criu_usable; then
    log "criu $(criu_version) at $(command -v criu) is usable"
else
    log "criu $(criu_version || true) is missing, older than $MIN_VERSION or fails 'criu check': building $(basename "$tree")"
    make -C "$tree" -j"$(nproc)" criu >"$tree/build.log" 2>&1 || { tail -20 "$tree/build.log" >&2; rm -f "$tree/.phaul-unpacked"; log "CRIU build failed, full log in $tree/build.log"; exit 1; }
    make -C "$tree" install-criu PREFIX=/usr/local >>"$tree/build.log" 2>&1
    hash -r
    criu_usable || { criu check >&2 || true; log "the CRIU just built fails 'criu check'; see above"; exit 1; }
    log "installed criu $(criu_version) at $(command -v criu)"
fi
echo "$tree"
