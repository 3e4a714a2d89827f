//! Keys computed from files, as actions/cache's `hashFiles('**/package-lock.json')` and
//! GitLab's `cache:key:files`: `{hashFiles:GLOB[,GLOB…]}` anywhere in a key is replaced by a
//! digest of the files the globs match under a root (the working directory, or `--files-root`).
//!
//! The digest, so that it is the same on every machine whatever order the file system lists a
//! directory in: the regular files matched by any of the globs (relative to the root, with `/`
//! between components, `.git` directories skipped, symlinks not followed), sorted by the bytes
//! of that relative path; then BLAKE3 over, for each file in that order, the path, a NUL byte,
//! the file's own BLAKE3 in lowercase hex (64 digits) and a newline; the first 32 lowercase hex
//! digits of that hash replace the placeholder. A glob matching no file is a usage error naming
//! it: a key computed from nothing would be the same for every lock file.
//!
//! The directories of the command's own caches are not walked: what a cache holds (a restored
//! `node_modules` with its packages' own lock files) must not change its key, or a warm runner
//! would compute another key than a fresh one.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::failure::Failure;
use crate::engine::io;

const OPEN: &str = "{hashFiles:";

/// Hex digits of the digest kept in a key: 128 bits, short enough to leave room in a key of at
/// most 128 characters.
const DIGITS: usize = 32;

/// `key` with every `{hashFiles:…}` replaced by the digest of its files under `root`, the
/// directories `skip` left out; a key without one is returned as it is.
pub fn expand(key: &str, root: &Path, skip: &[&Path]) -> Result<String, Failure> {
    let mut out = String::with_capacity(key.len());
    let mut rest = key;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let end = after.find('}').ok_or_else(|| {
            Failure::Usage(format!(
                "key {key:?}: {OPEN} is not closed by '}}' (write {OPEN}GLOB[,GLOB…]}})"
            ))
        })?;
        let globs: Vec<&str> = after[..end].split(',').map(str::trim).collect();
        if globs.iter().any(|g| g.is_empty()) {
            return Err(Failure::Usage(format!(
                "key {key:?}: an empty glob in {OPEN}{}}}",
                &after[..end]
            )));
        }
        out.push_str(&digest(&globs, root, skip)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The digest (see the module's doc) of the files under `root` that `globs` match, outside the
/// directories `skip`.
pub fn digest(globs: &[&str], root: &Path, skip: &[&Path]) -> Result<String, Failure> {
    let mut sets = Vec::with_capacity(globs.len());
    for g in globs {
        if g.starts_with('/') {
            return Err(Failure::Usage(format!(
                "glob {g:?} in {OPEN}…}}: globs are relative to the files root ({}; \
                 --files-root to change it)",
                root.display()
            )));
        }
        // `./package-lock.json` is the file at the root, as a shell would read it.
        let g = &g.trim_start_matches("./");
        // `*` stops at '/', `**` crosses directories: the globs of hashFiles and .gitignore.
        let glob = GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map_err(|e| Failure::Usage(format!("glob {g:?} in {OPEN}…}}: {e}")))?;
        sets.push(
            GlobSetBuilder::new()
                .add(glob)
                .build()
                .map_err(|e| Failure::Usage(format!("glob {g:?} in {OPEN}…}}: {e}")))?,
        );
    }
    let files = matching(&sets, root, skip)?;
    for (g, set) in globs.iter().zip(&sets) {
        if !files
            .keys()
            .any(|rel| set.is_match(Path::new(std::ffi::OsStr::from_bytes(rel))))
        {
            return Err(Failure::Usage(format!(
                "glob {g:?} in {OPEN}…}} matches no file under {}{} (a key computed from \
                 nothing would be the same for every run; fix the glob, or --files-root to look \
                 elsewhere)",
                root.display(),
                if skip.is_empty() {
                    ""
                } else {
                    " outside the caches' own directories"
                }
            )));
        }
    }
    let mut h = blake3::Hasher::new();
    for (rel, path) in &files {
        h.update(rel);
        h.update(b"\0");
        h.update(file_hash(path)?.to_hex().as_bytes());
        h.update(b"\n");
    }
    Ok(h.finalize().to_hex()[..DIGITS].to_string())
}

/// The regular files under `root` that any of `sets` matches, by the bytes of their relative
/// `/`-separated path (a BTreeMap orders `Vec<u8>` bytewise).
fn matching(
    sets: &[GlobSet],
    root: &Path,
    skip: &[&Path],
) -> Result<BTreeMap<Vec<u8>, PathBuf>, Failure> {
    let mut files = BTreeMap::new();
    // Compared as paths relative to the root, both sides without symlinks, so that a cache
    // directory given as `./node_modules` or through a link is still recognized.
    let real_root = root.canonicalize().map_err(io("open", root))?;
    let skipped: Vec<PathBuf> = skip
        .iter()
        .filter_map(|d| d.canonicalize().ok())
        .filter_map(|d| d.strip_prefix(&real_root).ok().map(Path::to_path_buf))
        .collect();
    if skipped.iter().any(|d| d.as_os_str().is_empty()) {
        // The root is itself a cache: nothing under it can key it.
        return Ok(files);
    }
    let walk = walkdir::WalkDir::new(&real_root)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| {
            let rel = e.path().strip_prefix(&real_root).unwrap_or(e.path());
            !(e.depth() > 0
                && e.file_type().is_dir()
                && (e.file_name() == ".git" || skipped.iter().any(|d| d == rel)))
        });
    for entry in walk {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            let e = e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("file system loop"));
            Failure::from(io("walk", path)(e))
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(&real_root)
            .expect("walkdir yields paths under its root");
        if sets.iter().any(|s| s.is_match(rel)) {
            // Components joined by '/' whatever the platform, so the bytes hashed are the same.
            let bytes = rel
                .components()
                .map(|c| c.as_os_str().as_bytes())
                .collect::<Vec<_>>()
                .join(&b'/');
            files.insert(bytes, entry.path().to_path_buf());
        }
    }
    Ok(files)
}

fn file_hash(path: &Path) -> Result<blake3::Hash, Failure> {
    let mut h = blake3::Hasher::new();
    let file = std::fs::File::open(path).map_err(io("open", path))?;
    h.update_reader(file).map_err(io("read", path))?;
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    const FILES: [(&str, &str); 4] = [
        ("package-lock.json", "root lock"),
        ("web/package-lock.json", "web lock"),
        ("api/deep/er/package-lock.json", "api lock"),
        ("web/README.md", "not matched"),
    ];

    #[test]
    fn the_digest_does_not_depend_on_creation_order() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for (rel, data) in FILES {
            write(a.path(), rel, data);
        }
        for (rel, data) in FILES.iter().rev() {
            write(b.path(), rel, data);
        }
        let key = "npm-{hashFiles:**/package-lock.json}";
        let (ka, kb) = (
            expand(key, a.path(), &[]).unwrap(),
            expand(key, b.path(), &[]).unwrap(),
        );
        assert_eq!(ka, kb);
        assert!(ka.starts_with("npm-") && ka.len() == 4 + DIGITS, "{ka}");
        assert!(ka[4..]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // `**` crossed directories: all three lock files, the README not.
        let three = expand(
            "{hashFiles:package-lock.json,web/package-lock.json,api/deep/er/package-lock.json}",
            a.path(),
            &[],
        )
        .unwrap();
        assert_eq!(&ka[4..], three);
        write(a.path(), "web/README.md", "changed, but not matched");
        assert_eq!(expand(key, a.path(), &[]).unwrap(), ka);
    }

    // The documented construction, computed by hand for one file: a user can recompute it.
    #[test]
    fn the_digest_is_the_documented_one() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a/Cargo.lock", "lock");
        let mut line = b"a/Cargo.lock\0".to_vec();
        line.extend_from_slice(blake3::hash(b"lock").to_hex().as_bytes());
        line.push(b'\n');
        let want = blake3::hash(&line).to_hex()[..32].to_string();
        assert_eq!(digest(&["**/Cargo.lock"], d.path(), &[]).unwrap(), want);
    }

    #[test]
    fn a_changed_byte_or_a_renamed_path_changes_the_digest() {
        let d = tempfile::tempdir().unwrap();
        for (rel, data) in FILES {
            write(d.path(), rel, data);
        }
        let glob = ["**/*.json"];
        let before = digest(&glob, d.path(), &[]).unwrap();
        write(d.path(), "web/package-lock.json", "web lock!");
        let changed = digest(&glob, d.path(), &[]).unwrap();
        assert_ne!(before, changed);
        write(d.path(), "web/package-lock.json", "web lock");
        assert_eq!(
            digest(&glob, d.path(), &[]).unwrap(),
            before,
            "back as it was"
        );
        std::fs::rename(d.path().join("web"), d.path().join("www")).unwrap();
        assert_ne!(
            digest(&glob, d.path(), &[]).unwrap(),
            before,
            "same bytes, other path"
        );
    }

    #[test]
    fn a_glob_matching_nothing_is_a_usage_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "package-lock.json", "x");
        write(d.path(), ".git/yarn.lock", "inside .git: never matched");
        let e = expand(
            "k-{hashFiles:package-lock.json,**/yarn.lock}",
            d.path(),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), super::super::exit::USAGE);
        assert!(e.to_string().contains("\"**/yarn.lock\""), "{e}");
        let e = expand("k-{hashFiles:/etc/passwd}", d.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("relative"), "{e}");
        assert_eq!(
            expand("{hashFiles:./package-lock.json}", d.path(), &[]).unwrap(),
            expand("{hashFiles:package-lock.json}", d.path(), &[]).unwrap()
        );
        let e = expand("k-{hashFiles:x", d.path(), &[]).unwrap_err();
        assert!(e.to_string().contains("not closed"), "{e}");
        assert_eq!(e.exit_code(), super::super::exit::USAGE);
    }

    #[test]
    fn keys_without_a_placeholder_are_left_alone() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(expand("npm-main", d.path(), &[]).unwrap(), "npm-main");
        write(d.path(), "go.sum", "sum");
        let k = expand("go-{hashFiles:go.sum}-{hashFiles:go.sum}", d.path(), &[]).unwrap();
        let (a, b) = k[3..].split_once('-').unwrap();
        assert_eq!(a, b);
    }

    // A cache's directory under the root (a restored node_modules with lock files of its own)
    // does not change its key, however it is spelled.
    #[test]
    fn the_caches_own_directories_are_not_hashed() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "package-lock.json", "lock");
        let key = "npm-{hashFiles:**/package-lock.json}";
        let cold = expand(key, d.path(), &[&d.path().join("node_modules")]).unwrap();
        write(
            d.path(),
            "node_modules/left-pad/package-lock.json",
            "its own",
        );
        let nm = d.path().join("web/../node_modules");
        std::fs::create_dir_all(d.path().join("web")).unwrap();
        let warm = expand(key, d.path(), &[&nm]).unwrap();
        assert_eq!(cold, warm);
        assert_ne!(
            expand(key, d.path(), &[]).unwrap(),
            cold,
            "hashed when not a cache"
        );
    }
}
