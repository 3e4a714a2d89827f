#!/usr/bin/env bash
# Assembles the image's runtime base from Debian's packages, as a tar of a root file system:
# glibc's and libgcc's shared objects, the CA bundle, /etc/passwd and /etc/group with root and
# nonroot (65532, as distroless has), /tmp, and each package's copyright and dpkg record (so that
# image scanners know which glibc this is). No shell, no package manager, no other binary.
#
#   hack/image-base.sh OUT.tar [EPOCH]
#
# The packages are the candidates of this machine's apt sources (`apt-get download`), so the
# base's glibc is the one the binary was linked against on this machine. EPOCH (seconds) is
# every entry's mtime; with sorted names and numeric owners the tar is the same byte for byte
# from one run to the next.
set -euo pipefail

out=$(realpath -m "$1")
epoch=${2:-0}
packages=(libc6 libgcc-s1 ca-certificates)

work=$(mktemp -d "${TMPDIR:-/tmp}/cachevol-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
root=$work/root
mkdir -p "$work/debs" "$root"

# apt-get download runs as _apt where it can: give it a directory it may write.
chmod 0777 "$work/debs"
(cd "$work/debs" && apt-get download -q "${packages[@]}" >/dev/null)
# libgcc-s1's copyright is its source package's (gcc-N-base, which it depends on).
gcc_base=$(dpkg-deb -f "$work"/debs/libgcc-s1_*.deb Depends | grep -o 'gcc-[0-9]*-base' | head -n 1)
(cd "$work/debs" && apt-get download -q "$gcc_base" >/dev/null)
mkdir -p "$root/var/lib/dpkg/status.d"
for deb in "$work"/debs/*.deb; do
  name=$(dpkg-deb -f "$deb" Package)
  echo "base: $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)" >&2
  dpkg-deb -x "$deb" "$work/pkg-$name"
  # distroless' convention: one control file per package under status.d, read by scanners.
  dpkg-deb -f "$deb" >"$root/var/lib/dpkg/status.d/$name"
  if [ -f "$work/pkg-$name/usr/share/doc/$name/copyright" ]; then
    mkdir -p "$root/usr/share/doc/$name"
    cp "$work/pkg-$name/usr/share/doc/$name/copyright" "$root/usr/share/doc/$name/"
  fi
done

# Shared objects only: libc6 also ships gconv modules (iconv, unused by a Rust binary),
# audit modules and docs.
for pkg in libc6 libgcc-s1; do
  (cd "$work/pkg-$pkg" && find . \( -type f -o -type l \) \( -name '*.so' -o -name '*.so.*' \) \
    -not -path '*/gconv/*' -not -path '*/audit/*' -print0) |
    tar -C "$work/pkg-$pkg" --null -T - -cf - | tar -C "$root" -xf -
done

# The CA bundle, as update-ca-certificates would write it (every certificate Debian ships is
# enabled by default): rustls-native-certs reads /etc/ssl/certs/ca-certificates.crt.
mkdir -p "$root/etc/ssl/certs"
find "$work/pkg-ca-certificates/usr/share/ca-certificates" -name '*.crt' | LC_ALL=C sort |
  xargs cat >"$root/etc/ssl/certs/ca-certificates.crt"

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
# glibc resolves names with its built-in files and dns modules; say so rather than rely on
# its defaults.
echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
# Debian's own description of itself, for scanners (the base is Debian's packages).
cp -L /etc/os-release "$root/etc/os-release"
mkdir -p "$root/tmp" "$root/root" "$root/home/nonroot"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root" "$root/home/nonroot"
chown 65532:65532 "$root/home/nonroot"

mkdir -p "$(dirname "$out")"
tar --sort=name --mtime="@$epoch" --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$root" -cf "$out" .
