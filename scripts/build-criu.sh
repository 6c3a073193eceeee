#!/usr/bin/env bash
# Makes sure a usable CRIU (>= 4.2, passing `criu check`) is installed and that
# its source tree (needed for pycriu) is unpacked under $PHAUL_CACHE.
# Prints the path of the CRIU source tree on stdout.
# Never adds non-bookworm binary sources: it fetches only Debian's source
# tarball through a private, source-only apt configuration.
#
# CRIU is built with the patches in patches/criu/ (see patches/criu/README):
# the build is named "GitID: v<version>-phaul-<hash of the patches>" and an
# installed criu whose `criu --version` lacks that exact GitID is rebuilt.
# CRIU_PREFIX (default /usr/local) says where to install it.
set -euo pipefail
shopt -s inherit_errexit

CACHE=${PHAUL_CACHE:-/var/cache/phaul}
PREFIX=${CRIU_PREFIX:-/usr/local}
PATCHES=$(cd "$(dirname "$0")/.." && pwd)/patches/criu
TESTED_VERSION=4.2.1-1
MIN_VERSION=4.2
log() { echo "setup: $*" >&2; }

CRIU=$PREFIX/sbin/criu

criu_version() {  # prints "X.Y[.Z]" of $CRIU, or nothing
    [ -x "$CRIU" ] || return 0
    "$CRIU" --version 2>/dev/null | awk '/^Version:/ {print $2}'
}

patch_id() {  # "phaul-" and a hash of the patch files, the GitID suffix of our build
    echo "phaul-$(cat "$PATCHES"/*.patch | sha256sum | cut -c1-12)"
}

criu_patched() {  # $CRIU reports the GitID of a build with exactly our patches
    local out  # not piped into grep -q: with pipefail, criu's SIGPIPE would fail the test
    [ -x "$CRIU" ] && out=$("$CRIU" --version 2>/dev/null) && grep -qx "GitID: .*-$(patch_id)" <<<"$out"
}

version_ok() {  # version_ok HAVE WANT: HAVE >= WANT
    [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]
}

criu_usable() {
    local v; v=$(criu_version)
    version_ok "$v" "$MIN_VERSION" && criu_patched && "$CRIU" check >/dev/null 2>&1
}

patched_tree() {  # a copy of the source tree $1 with patches/criu/*.patch applied, printed
    local tree=$1 build
    build=$CACHE/build/$(basename "$tree")-$(patch_id)
    if [ ! -f "$build/.phaul-patched" ]; then
        rm -rf "$build" "$build.tmp"; mkdir -p "$CACHE/build"
        cp -a "$tree" "$build.tmp"
        rm -f "$build.tmp/.phaul-unpacked"
        for p in "$PATCHES"/*.patch; do
            patch -d "$build.tmp" -p1 --forward --quiet < "$p" >&2 || { log "patch $(basename "$p") does not apply to $(basename "$tree")"; exit 1; }
        done
        mv "$build.tmp" "$build"; touch "$build/.phaul-patched"
    fi
    echo "$build"
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
    log "criu $(criu_version) at $CRIU ($(patch_id)) is usable"
else
    build=$(patched_tree "$tree")
    gitid="v$(basename "$tree" | sed 's/^criu-//')-$(patch_id)"
    log "criu $(criu_version || true) at $CRIU is missing, older than $MIN_VERSION, lacks the patches of patches/criu or fails 'criu check': building $(basename "$build")"
    make -C "$build" -j"$(nproc)" criu GITID="$gitid" >"$build/build.log" 2>&1 || { tail -20 "$build/build.log" >&2; rm -f "$build/.phaul-patched"; log "CRIU build failed, full log in $build/build.log"; exit 1; }
    make -C "$build" install-criu PREFIX="$PREFIX" GITID="$gitid" >>"$build/build.log" 2>&1
    hash -r
    criu_usable || { "$CRIU" check >&2 || true; log "the CRIU just built fails 'criu check' or lacks its GitID; see above"; exit 1; }
    log "installed criu $(criu_version) ($gitid) at $CRIU"
fi
echo "$tree"
