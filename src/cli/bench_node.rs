//! `cachevol bench --node`: what a pod waits for on a node, on real trees — the node plugin's
//! publish (cold: the base is not on the node; warm: it is) and the commit of a finished view
//! (unchanged, and after 1 % new files), measured in-process through the same code
//! NodePublishVolume and the commit run (the gRPC hop adds well under a millisecond).
//! Needs root (mounts).
//!
//! The fresh node column compares a cold publish (the base written as an EROFS image) with
//! what a job would do instead, in the same run: `zstd -d | tar -x` of the tree into a fresh
//! directory; and the publish followed by reading every file of the view once with
//! `tar -cf - . | cat >/dev/null` against the extract followed by the same read. The cold
//! publish as a tree of files (kernels that cannot mount images) is measured too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::engine::{io, CommitOptions, Engine, Error, IoError, Store};
use crate::node::{CommitDecision, NodeConfig, Publish, Volumes};
use crate::spec::{Ending, PodRef, VolumeSpec};

#[derive(Clone, Debug, Serialize)]
pub struct NodeFigures {
    pub tree: String,
    pub files: u64,
    pub bytes: u64,
    /// `zstd -d | tar -x` of the tree into a fresh directory.
    pub extract_s: f64,
    /// Reading every file of the extracted tree once.
    pub extract_read_s: f64,
    /// A fresh node's publish (the base written as an image), and reading every file of the
    /// view once after it.
    pub fresh_publish_s: f64,
    pub fresh_read_s: f64,
    /// How much the process's RSS peaked above where it was during a fresh node's publish
    /// (what the publish needs on top of the node plugin's own memory).
    pub fresh_rss_added_mib: f64,
    /// A cold publish with the base written as a tree of files.
    pub publish_cold_s: f64,
    pub publish_warm_s: f64,
    pub commit_unchanged_s: f64,
    pub commit_unchanged_uploaded: u64,
    pub commit_1pct_s: f64,
    pub commit_1pct_uploaded: u64,
    pub new_bytes_1pct: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn volumes(state: &Path, base_images: bool) -> Result<Volumes, Error> {
    Volumes::new(NodeConfig {
        node_id: "bench".into(),
        state_dir: state.to_path_buf(),
        default_store: None,
        force_copy: false,
        base_budget: None,
        base_images,
    })
    .map_err(|e| Error::Lock(e.to_string()))
}

fn context(store: &str, key: &str) -> HashMap<String, String> {
    [
        ("store", store),
        ("scope", "bench"),
        ("key", key),
        ("mode", "private"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn publish(
    v: &Volumes,
    target: &Path,
    ctx: &HashMap<String, String>,
    pod: &str,
) -> Result<f64, Error> {
    let t = Instant::now();
    v.publish(Publish {
        volume_id: "cv-bench".into(),
        target: target.to_path_buf(),
        spec: VolumeSpec::from_publish(ctx, None).map_err(|e| Error::Lock(e.to_string()))?,
        read_only: false,
        pod: Some(PodRef {
            name: pod.into(),
            namespace: "bench".into(),
            uid: format!("uid-{pod}"),
            service_account: "default".into(),
        }),
        group: None,
        selinux_context: None,
    })
    .await
    .map_err(|e| Error::Lock(e.to_string()))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Unpublishes and commits as a pod that ended with `ending`; the commit's seconds and upload.
async fn finish(v: &Volumes, target: &Path, ending: Ending) -> Result<(f64, u64), Error> {
    let view = v
        .unpublish("cv-bench", target)
        .await
        .map_err(|e| Error::Lock(e.to_string()))?
        .ok_or_else(|| Error::Lock("view still mounted elsewhere".into()))?;
    let t = Instant::now();
    let d = v
        .commit(&view.id, ending)
        .await
        .map_err(|e| Error::Lock(e.to_string()))?;
    let secs = t.elapsed().as_secs_f64();
    Ok(match d {
        CommitDecision::Committed(r) => (secs, r.uploaded),
        CommitDecision::Skipped(_) | CommitDecision::Fenced(_) | CommitDecision::NotPending => {
            (secs, 0)
        }
    })
}

/// Writes new files totalling about `bytes` (pseudo-random, so they do not compress away).
fn add_new_files(dir: &Path, bytes: u64, seed: u64) -> std::io::Result<u64> {
    let d = dir.join(format!("bench-new-{seed}"));
    std::fs::create_dir_all(&d)?;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut written = 0;
    let mut i = 0;
    while written < bytes {
        let n = (bytes - written).min(64 << 10) as usize;
        let data: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(d.join(format!("f{i}")), &data)?;
        written += n as u64;
        i += 1;
    }
    Ok(written)
}

/// Measures one tree: `runs` cold publishes (fresh node each), then on one node `runs` rounds
/// of warm publish + unchanged commit, then `runs` rounds of warm publish + 1 % + commit.
pub async fn measure(
    tree: &Path,
    store_url: &str,
    work: &Path,
    runs: usize,
) -> Result<NodeFigures, Error> {
    let key = "tree";
    let engine = Engine::new(Store::open(store_url)?, "bench", work.join("cli-state"))?;
    let first = engine.commit(key, tree, &CommitOptions::default()).await?;
    let ctx = context(store_url, key);

    // What a job would do instead: the tree as a .tar.zst, extracted into a fresh directory,
    // then every file read once.
    let tarball = work.join("tree.tar.zst");
    timed(
        r#"tar -C "$1" -cf - . | zstd -T0 -3 -q -o "$2""#,
        &[tree, &tarball],
    )?;
    let (mut extract, mut extract_read) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let dir = work.join(format!("extract-{i}"));
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        settle();
        extract.push(timed(
            r#"zstd -d -q -c "$1" | tar -C "$2" -xf -"#,
            &[&tarball, &dir],
        )?);
        extract_read.push(read_all(&dir)?);
    }

    let (mut fresh, mut fresh_read, mut fresh_rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let v = volumes(&work.join(format!("fresh-node-{i}")), true)?;
        let target = work.join(format!("fresh-target-{i}"));
        settle();
        let before = reset_peak_rss();
        fresh.push(publish(&v, &target, &ctx, &format!("fresh{i}")).await?);
        fresh_rss.push(status_mib("VmHWM:") - before);
        fresh_read.push(read_all(&target)?);
        finish(&v, &target, Ending::Aborted).await?;
    }

    let mut cold = Vec::new();
    for i in 0..runs {
        let v = volumes(&work.join(format!("cold-node-{i}")), false)?;
        let target = work.join(format!("cold-target-{i}"));
        settle();
        cold.push(publish(&v, &target, &ctx, &format!("cold{i}")).await?);
        finish(&v, &target, Ending::Aborted).await?;
    }

    let v = volumes(&work.join("warm-node"), true)?;
    let target = work.join("warm-target");
    publish(&v, &target, &ctx, "prime").await?;
    finish(&v, &target, Ending::Aborted).await?;
    let (mut warm, mut unchanged, mut unchanged_up) = (Vec::new(), Vec::new(), 0);
    for i in 0..runs {
        warm.push(publish(&v, &target, &ctx, &format!("w{i}")).await?);
        let (s, up) = finish(&v, &target, Ending::Succeeded).await?;
        unchanged.push(s);
        unchanged_up = unchanged_up.max(up);
    }
    let (mut changed, mut changed_up, mut new_bytes) = (Vec::new(), Vec::new(), 0);
    for i in 0..runs {
        publish(&v, &target, &ctx, &format!("c{i}")).await?;
        new_bytes = add_new_files(&target, first.bytes / 100, i as u64 + 1)
            .map_err(io("write", &target))?;
        let (s, up) = finish(&v, &target, Ending::Succeeded).await?;
        changed.push(s);
        changed_up.push(up as f64);
    }
    Ok(NodeFigures {
        tree: tree.display().to_string(),
        files: first.files,
        bytes: first.bytes,
        extract_s: median(extract),
        extract_read_s: median(extract_read),
        fresh_publish_s: median(fresh),
        fresh_read_s: median(fresh_read),
        fresh_rss_added_mib: fresh_rss.into_iter().fold(0.0, f64::max),
        publish_cold_s: median(cold),
        publish_warm_s: median(warm),
        commit_unchanged_s: median(unchanged),
        commit_unchanged_uploaded: unchanged_up,
        commit_1pct_s: median(changed),
        commit_1pct_uploaded: median(changed_up) as u64,
        new_bytes_1pct: new_bytes,
    })
}

/// Writes back what earlier steps left dirty, so that no step pays for the one before it (on
/// a small machine, writeback competes for the same CPUs).
fn settle() {
    rustix::fs::sync();
}

/// Runs `script` with `sh -c` and `args` as $1, $2, ...; its wall time in seconds.
fn timed(script: &str, args: &[&Path]) -> Result<f64, Error> {
    let t = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .status()
        .map_err(io("run", "sh"))?;
    if !status.success() {
        return Err(IoError::other("run", script, format!("{status}")).into());
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Reads every file under `dir` once, as a job would (GNU tar reads the files only when its
/// output is not /dev/null).
fn read_all(dir: &Path) -> Result<f64, Error> {
    timed(r#"cd "$1" && tar -cf - . | cat >/dev/null"#, &[dir])
}

/// Resets the process's peak RSS (VmHWM) to its current RSS, so the next reading is the peak
/// of what runs in between; returns that current RSS in MiB.
fn reset_peak_rss() -> f64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_mib("VmRSS:")
}

/// A `kB` line of /proc/self/status (`VmRSS:`, `VmHWM:`) in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A markdown table of the figures.
pub fn table(rows: &[NodeFigures]) -> String {
    let mut s = String::from(
        "| tree | files | MB | extract | fresh node publish (× extract, goal ≤ 0.3) | extract + read | fresh node publish + read (×, goal ≤ 0.5) | fresh node publish: RSS added | cold publish as files | publish warm (goal ≤ 20 ms) | commit unchanged (goal ≤ 50 ms, 0 B) | commit 1 % new | uploaded / new bytes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let (ex, ex_read) = (r.extract_s, r.extract_s + r.extract_read_s);
        let (pu, pu_read) = (r.fresh_publish_s, r.fresh_publish_s + r.fresh_read_s);
        s += &format!(
            "| {} | {} | {:.0} | {:.0} ms | {:.0} ms ({:.2}×) | {:.0} ms | {:.0} ms ({:.2}×) | {:.0} MiB | {:.0} ms | {:.1} ms | {:.1} ms, {} B | {:.0} ms | {:.2} |\n",
            Path::new(&r.tree)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            r.files,
            r.bytes as f64 / 1e6,
            ex * 1e3,
            pu * 1e3,
            pu / ex.max(1e-9),
            ex_read * 1e3,
            pu_read * 1e3,
            pu_read / ex_read.max(1e-9),
            r.fresh_rss_added_mib,
            r.publish_cold_s * 1e3,
            r.publish_warm_s * 1e3,
            r.commit_unchanged_s * 1e3,
            r.commit_unchanged_uploaded,
            r.commit_1pct_s * 1e3,
            r.commit_1pct_uploaded as f64 / r.new_bytes_1pct.max(1) as f64
        );
    }
    s
}

/// Runs the node benchmark on `trees` in a scratch dir under `work`, which the caller removes.
pub async fn run(
    trees: &[PathBuf],
    store_url: Option<&str>,
    work: &Path,
    runs: usize,
) -> Result<Vec<NodeFigures>, Error> {
    let mut out = Vec::new();
    for (i, tree) in trees.iter().enumerate() {
        let w = work.join(format!("node-{i}"));
        std::fs::create_dir_all(&w).map_err(io("create", &w))?;
        let store = match store_url {
            Some(u) => format!(
                "{}/node-{i}-{}",
                u.trim_end_matches('/'),
                std::process::id()
            ),
            None => format!("file://{}", w.join("store").display()),
        };
        // Nothing is deleted until every tree is measured: creating many files right after a
        // large deletion is several times slower on ext4 and would skew the next tree's figures.
        let measured = measure(tree, &store, &w, runs).await;
        // The nodes' bases are mounted images: unmounted before the caller removes the dir.
        crate::node::mount::unmount_all_under(&w).map_err(io("unmount under", &w))?;
        out.push(measured?);
    }
    Ok(out)
}
