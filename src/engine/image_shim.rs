//! DEV SHIM — NOT TO BE COMMITTED. Mimics the image writer's API with mkfs.erofs.
use super::error::{Error, Result};
use super::localstate::{self, DirState};
use super::restore::RestoreSource;
use super::Engine;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    pub group: Option<u32>,
    pub record: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ImageReport {
    pub source: RestoreSource,
    pub files: u64,
    pub bytes: u64,
    pub downloaded: u64,
    pub image_bytes: u64,
    pub seconds: f64,
}

impl Engine {
    pub async fn restore_image(
        &self,
        source: RestoreSource,
        image: &Path,
        opts: ImageOptions,
    ) -> Result<ImageReport> {
        let tmp = image.with_extension("shimtree");
        let r = self.restore_source(source.clone(), &tmp).await?;
        if let Some(g) = opts.group {
            let t = tmp.clone();
            std::process::Command::new("chgrp")
                .arg("-R")
                .arg(g.to_string())
                .arg(&t)
                .status()
                .unwrap();
            std::process::Command::new("chmod")
                .arg("-R")
                .arg("g+rwX")
                .arg(&t)
                .status()
                .unwrap();
        }
        let st = std::process::Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(image)
            .arg(&tmp)
            .status()
            .map_err(Error::io("mkfs", image))?;
        assert!(st.success());
        if let Some(rec) = opts.record {
            let t = localstate::canonical(&tmp)?;
            let mut s =
                DirState::load(&self.state_dir, &t, self.store.display_url(), &self.scope).unwrap();
            s.header.dir = localstate::canonical(&rec)?;
            s.stats = vec![None; s.entries.len()];
            s.save(&self.state_dir)?;
        }
        std::fs::remove_dir_all(&tmp).ok();
        Ok(ImageReport {
            source: r.source,
            files: r.files,
            bytes: r.bytes,
            downloaded: r.downloaded,
            image_bytes: 0,
            seconds: r.seconds,
        })
    }
}
