#!/usr/bin/env bash
# Builds the cachevol image without a container daemon or a registry (`make image`) and writes it
# as an OCI archive, which `podman load -i` and `ctr -n k8s.io images import` take:
#
#   target/image/cachevol.tar     the image, tagged $IMAGE (default localhost/cachevol:dev)
#   target/image/cachevol         the stripped binary it holds
#   target/image/cachevol.debug   that binary's debug info (gdb finds it by its debuglink)
#   target/image/digests          the manifest's and the layers' digests and sizes
#
# 1. cargo builds the release binary; it is stripped, its debug info split off.
# 2. hack/image-base.sh assembles the runtime base from Debian's packages (glibc, libgcc, CA
#    certificates), and buildah commits it to a private store under target/image/.
# 3. buildah builds the Dockerfile with BINARY=prebuilt on that base, at the time of the
#    commit being built: the same commit gives the same layer digests, build after build.
#
# Environment: IMAGE (the tag), SOURCE_DATE_EPOCH (default: the commit's time), CARGO, and
# CARGO_TARGET_DIR (where cargo builds; the outputs above stay under this checkout's target/).
# Tools missing from the machine (buildah, binutils) are installed with apt-get.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
image=${IMAGE:-localhost/cachevol:dev}
out=$repo/target/image
cargo=${CARGO:-cargo}
release=${CARGO_TARGET_DIR:-$repo/target}/release

need=()
for tool in buildah:buildah objcopy:binutils dpkg-deb:dpkg python3:python3; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} with apt-get" >&2
  sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# A tree with changes is not the commit: say so in the version and the labels.
if [ "$commit" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
  commit=$commit-dirty
fi
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
mkdir -p "$out"

echo "==> cargo build --release (cachevol $version, commit $commit)" >&2
short=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
case $commit in *-dirty) short=$short-dirty ;; esac
CACHEVOL_COMMIT=$short "$cargo" build --release --locked --quiet
# Split, strip, link: the image gets 26 MB instead of 150 MB (line tables for backtraces stay
# in the .debug file, which gdb and addr2line find by the debuglink).
objcopy --only-keep-debug "$release/cachevol" "$out/cachevol.debug"
objcopy --strip-all --add-gnu-debuglink="$out/cachevol.debug" "$release/cachevol" "$out/cachevol"
touch -d "@$epoch" "$out/cachevol" "$out/cachevol.debug"

# buildah's own store and run dir, under target/: nothing goes to the machine's
# /var/lib/containers, and vfs needs no overlay support from the file system under target/.
store=(--root "$out/storage" --runroot "$out/run" --storage-driver vfs)
base_tag=localhost/cachevol-base:$version

echo "==> the runtime base from Debian's packages" >&2
bash hack/image-base.sh "$out/base.tar" "$epoch"
buildah "${store[@]}" rmi -f "$base_tag" >/dev/null 2>&1 || true
ctr=$(buildah "${store[@]}" from scratch)
trap 'buildah "${store[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah "${store[@]}" add "$ctr" "$out/base.tar" / >/dev/null
buildah "${store[@]}" commit --quiet --timestamp "$epoch" --identity-label=false \
  --omit-history "$ctr" "$base_tag" >/dev/null

echo "==> buildah bud -t $image (BINARY=prebuilt)" >&2
buildah "${store[@]}" rmi -f "$image" >/dev/null 2>&1 || true
buildah "${store[@]}" bud --quiet --pull=never --timestamp "$epoch" --identity-label=false \
  --build-arg BINARY=prebuilt --build-arg PREBUILT=target/image/cachevol \
  --build-arg TARGETPLATFORM="linux/$(dpkg --print-architecture)" \
  --build-arg RUNTIME_IMAGE="$base_tag" --build-arg VERSION="$version" \
  --build-arg REVISION="$commit" --build-arg CREATED="$created" \
  -f Dockerfile -t "$image" . >/dev/null

rm -f "$out/cachevol.tar"
buildah "${store[@]}" push --quiet "$image" "oci-archive:$out/cachevol.tar:$image"
# The digests and sizes, read off the archive itself (what a registry or containerd will see).
python3 - "$out/cachevol.tar" >"$out/digests" <<'PY'
import gzip, hashlib, json, sys, tarfile
with tarfile.open(sys.argv[1]) as a:
    blob = lambda d: a.extractfile("blobs/" + d.replace(":", "/")).read()
    index = json.loads(a.extractfile("index.json").read())
    desc = index["manifests"][0]
    manifest = json.loads(blob(desc["digest"]))
    print("manifest", desc["digest"], desc["size"])
    print("config", manifest["config"]["digest"], manifest["config"]["size"])
    total = 0
    for layer in manifest["layers"]:
        data = blob(layer["digest"])
        raw = len(gzip.decompress(data)) if "gzip" in layer["mediaType"] else len(data)
        total += raw
        print("layer", layer["digest"], layer["size"], "uncompressed", raw)
    print("image uncompressed", total)
PY
cat "$out/digests" >&2
echo "==> $out/cachevol.tar ($image): binary $(stat -c %s "$out/cachevol") B, archive $(stat -c %s "$out/cachevol.tar") B" >&2
