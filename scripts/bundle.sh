#!/bin/sh
# Builds the host bundle: dist/matrix-host-bundle.tar.gz and its checksum
# file dist/matrix-host-bundle.tar.gz.sha256 ("<hex>  <name>").
#
# The tarball is reproducible: the same commit, built with the same Rust
# toolchain, Cargo.lock and checkout path (rustc writes source paths into
# the binary), gives the same bytes. Entries are sorted by name, owned by
# 0:0 with fixed modes, dated SOURCE_DATE_EPOCH (default: the commit time),
# and gzip stores no name or time.
#
# Environment:
#   IMAGE_VERSION       version written to the MANIFEST
#                       (default: git describe --always --dirty)
#   SOURCE_DATE_EPOCH   seconds since 1970 for every entry's mtime
#                       (default: the committer time of HEAD)
#   CARGO_TARGET_DIR    cargo's target directory (default: target)
#
# Layout of the tarball, which cloud-init unpacks into /opt/matrix:
#   matrix-host-bundle/MANIFEST     version and SHA-256 of every other file
#   matrix-host-bundle/install.sh   the installer, run as root
#   matrix-host-bundle/bin/matrix-agent
#   matrix-host-bundle/units/*.service, *.timer, matrix-gateway.service.d/
set -eu

cd "$(dirname "$0")/.."

name=matrix-host-bundle
stage_root=build/bundle
stage="$stage_root/$name"
target_dir="${CARGO_TARGET_DIR:-target}"

if [ -z "${IMAGE_VERSION:-}" ] || [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    if ! git rev-parse --verify --quiet HEAD >/dev/null 2>&1; then
        echo "bundle.sh: $(pwd) is not a git checkout with a commit;" \
            "set IMAGE_VERSION and SOURCE_DATE_EPOCH" >&2
        exit 2
    fi
fi
version="${IMAGE_VERSION:-$(git describe --always --dirty)}"
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
case "$version" in
    "" | *[!A-Za-z0-9._+-]*)
        echo "bundle.sh: invalid version '$version'; IMAGE_VERSION may" \
            "contain only letters, digits and . _ + -" >&2
        exit 2
        ;;
esac
case "$epoch" in
    "" | *[!0-9]*)
        echo "bundle.sh: invalid SOURCE_DATE_EPOCH '$epoch'; expected" \
            "seconds since 1970" >&2
        exit 2
        ;;
esac

# Runs started at once (parallel test processes, say) take turns, because
# each one empties build/bundle/ and rewrites dist/.
mkdir -p build
exec 9>build/bundle.lock
flock 9

cargo build --release --locked -p matrix-agent

rm -rf "$stage_root"
mkdir -p "$stage/bin" "$stage/units/matrix-gateway.service.d" dist

cp "$target_dir/release/matrix-agent" "$stage/bin/"
cp bundle/install.sh "$stage/"
cp units/matrix-restore.service units/matrix-db-backup.service \
    units/matrix-db-backup.timer units/matrix-heartbeat.service \
    "$stage/units/"
cp units/matrix-gateway.service.d/10-restore-gate.conf \
    "$stage/units/matrix-gateway.service.d/"

# Modes are set here, not inherited from the checkout or the umask.
find "$stage" -type d -exec chmod 0755 {} +
find "$stage" -type f -exec chmod 0644 {} +
chmod 0755 "$stage/bin/matrix-agent" "$stage/install.sh"

# sha256sum --check skips lines that start with '#', so install.sh checks
# the MANIFEST as it is. It is written outside the stage first, so that it
# does not list itself.
{
    echo "# $name: SHA-256 of every other file in the bundle."
    echo "# Check with: sha256sum --check --strict MANIFEST"
    echo "# version: $version"
    (cd "$stage" && find . -type f | sed 's|^\./||' | LC_ALL=C sort |
        xargs sha256sum)
} > "$stage_root/MANIFEST"
mv "$stage_root/MANIFEST" "$stage/MANIFEST"
chmod 0644 "$stage/MANIFEST"

# tar and gzip run one after the other, because sh has no pipefail to
# report a failed tar inside a pipeline.
tarball="dist/$name.tar.gz"
LC_ALL=C tar --create --format=gnu --sort=name \
    --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
    --file="$stage_root/$name.tar" --directory="$stage_root" "$name"
gzip -n -9 < "$stage_root/$name.tar" > "$tarball.partial"
mv "$tarball.partial" "$tarball"
(cd dist && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256.partial")
mv "dist/$name.tar.gz.sha256.partial" "dist/$name.tar.gz.sha256"

echo "bundle.sh: built $tarball ($version):" \
    "$(cut -d' ' -f1 "$tarball.sha256")" >&2
