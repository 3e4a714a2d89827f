//! Restore into an image: a generation written as one read-only EROFS file system image (see
//! [`super::erofs`]) instead of a tree of files, so a node can mount it (loop, read-only) as the
//! lower layer of a pod's overlay without creating a file per entry. The same verified chunk
//! stream as a tree restore, the same validation; the image is written under a temporary name
//! next to `image` and renamed into place only when complete.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::erofs::{Attrs, Image};
use super::error::{Error, Result};
use super::format::{BaseRef, Entry, Kind};
use super::localstate::{self, DirState};
use super::restore::{current_umask, plan_chunks, Deliver, RestoreSource};
use super::{names, Engine};

/// How an image restore sets ownership, and where the image will be seen.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// A pod's fsGroup: every inode gets this group, directories group rwx and setgid, files
    /// group rw (and x where the owner has it), as the node's group bases get.
    pub group: Option<u32>,
    /// The directory the image will be mounted at: once the image is in place, it gets the
    /// record a tree restore into it would get (the generation and its tree), so a commit
    /// over it reads only what changed.
    pub record: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    pub source: RestoreSource,
    pub files: u64,
    pub bytes: u64,
    /// Compressed bytes fetched from the store.
    pub downloaded: u64,
    /// The image's length.
    pub image_bytes: u64,
    pub seconds: f64,
}

impl Engine {
    /// Writes exactly `source` (a generation, or nothing: an image of an empty directory) as an
    /// EROFS image at `image`, with the content a tree restore of it gives: the same entries,
    /// modes, mtimes and bytes, owned by this process's user and group (or `opts.group`). A
    /// snapshot that fails verification is refused as by a restore, and no image is left.
    pub async fn restore_image(
        &self,
        source: RestoreSource,
        image: &Path,
        opts: ImageOptions,
    ) -> Result<ImageReport> {
        let started = Instant::now();
        let found = match &source {
            RestoreSource::Key { key, generation }
            | RestoreSource::RestoreKey { key, generation } => Some((key.clone(), *generation)),
            RestoreSource::Miss => None,
        };
        let (g, entries) = match &found {
            Some((key, generation)) => {
                names::key(key)?;
                let (g, e) = self.load_tree(key, *generation).await?;
                (Some(g), e)
            }
            None => (None, Vec::new()),
        };
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "image: manifest loaded"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let attrs = Attrs {
            uid: rustix::process::geteuid().as_raw(),
            gid: opts
                .group
                .unwrap_or_else(|| rustix::process::getegid().as_raw()),
            widen: opts.group.is_some(),
            root_mode: 0o777 & !current_umask(),
            root_mtime: now,
        };
        let entries = Arc::new(entries);
        let plan = Arc::new(Image::plan(&entries, attrs)?);
        let temp = partial_name(image);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(Error::io("create", &temp))?;
        let file = Arc::new(file);
        let written = async {
            file.set_len(plan.image_len())
                .map_err(Error::io("allocate", &temp))?;
            let downloaded = self
                .write_image(&file, &temp, plan.clone(), entries.clone())
                .await?;
            Ok::<_, Error>(downloaded)
        };
        let touch = async {
            if let Some((key, _)) = &found {
                self.touch_used(key).await;
            }
        };
        let (written, _) = futures::join!(written, touch);
        let downloaded = match written {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                self.quarantine_from(&e).await;
                return Err(e);
            }
        };
        drop(file);
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "image: data written"
        );
        if let Err(e) = std::fs::rename(&temp, image) {
            let _ = std::fs::remove_file(&temp);
            return Err(Error::io("rename into place", image)(e));
        }
        if let Some(dir) = &opts.record {
            let dir = localstate::canonical(dir)?;
            let base = found.map(|(key, generation)| BaseRef { key, generation });
            let manifest = g.as_ref().map(|g| g.manifest.clone()).unwrap_or_default();
            let entries = Arc::try_unwrap(entries).unwrap_or_else(|shared| (*shared).clone());
            let stats = vec![None; entries.len()];
            DirState {
                header: self.header(&dir, base, manifest),
                entries,
                stats,
            }
            .save(&self.state_dir)?;
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "image: record saved"
            );
        }
        let totals = g.map(|g| g.totals).unwrap_or_default();
        Ok(ImageReport {
            source,
            files: totals.files,
            bytes: totals.bytes,
            downloaded,
            image_bytes: plan.image_len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes the metadata of `plan` and, as verified chunks arrive (once the metadata is
    /// written: it holds the inline tails of files), every file's bytes at its place.
    async fn write_image(
        &self,
        file: &Arc<std::fs::File>,
        path: &Path,
        plan: Arc<Image>,
        entries: Arc<Vec<Entry>>,
    ) -> Result<u64> {
        let chunks = plan_chunks(&self.layout, &entries, |_| false)?;
        let total: u64 = entries.iter().map(|e| e.size).sum();
        self.progress.start("restore", total);
        self.progress.files(
            entries
                .iter()
                .filter(|e| e.kind == Kind::File && !e.chunks.is_empty())
                .count() as u64,
        );
        let failed = Arc::new(AtomicBool::new(false));
        let (prepared, ready) = tokio::sync::watch::channel(false);
        let metadata = {
            let (file, plan, entries) = (file.clone(), plan.clone(), entries.clone());
            let (path, failed) = (path.to_path_buf(), failed.clone());
            async move {
                let t0 = Instant::now();
                let res = tokio::task::spawn_blocking(move || {
                    plan.write_metadata(&entries, |at, data| {
                        file.write_all_at(data, at)
                            .map_err(Error::io("write", &path))
                    })
                })
                .await
                .expect("writing metadata does not panic");
                if res.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                tracing::debug!(
                    ms = t0.elapsed().as_millis() as u64,
                    "image: metadata written"
                );
                let _ = prepared.send(true);
                res
            }
        };
        let remaining: Arc<Vec<AtomicU32>> = Arc::new(
            entries
                .iter()
                .map(|e| AtomicU32::new(e.chunks.len() as u32))
                .collect(),
        );
        let deliver: Deliver = {
            let (file, path, failed) = (file.clone(), path.to_path_buf(), failed.clone());
            let progress = self.progress.clone();
            Arc::new(move |need, at, data| {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let last = at + data.len() as u64 == need.r.n as u64;
                for &(i, offset) in &need.targets {
                    for (to, range) in plan.file_ranges(i, offset + at, data.len() as u64) {
                        if !range.is_empty() {
                            let part = &data[range.start as usize..range.end as usize];
                            file.write_all_at(part, to)
                                .map_err(Error::io("write", &path))?;
                        }
                    }
                    progress.advance(data.len() as u64);
                    if last && remaining[i].fetch_sub(1, Ordering::AcqRel) == 1 {
                        progress.file_done();
                    }
                }
                Ok(())
            })
        };
        let fetch = self.fetch_chunks(chunks, ready, failed, deliver);
        let (metadata, fetched) = futures::join!(metadata, fetch);
        metadata?;
        let downloaded = fetched?;
        self.progress.finish();
        Ok(downloaded)
    }
}

/// The temporary name an image is written under: next to it, hidden, unique to the process.
fn partial_name(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    image.with_file_name(format!(".{name}.partial-{}", super::protect::unique_id()))
}
