//! The state file's lifecycle around the running server: restoring it at start, and the
//! snapshot thread that writes it every `--snapshot-interval`.
//!
//! The workers only copy their tables, a shard at a time; merging and writing happen on the
//! snapshot thread, at the lowest CPU priority, off the data path, one shard at a time too. The
//! file format is `snapshot`'s.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::cluster::Cluster;
use crate::keyed_hash::SHARDS;
use crate::snapshot::{self, BadState, SnapshotCounters, StateWriter};
use crate::socket;
use crate::store::{AppRecord, AppTable};

/// Reads the state file at `path` for a start. A bad file stops the start unless
/// `discard_bad_state` says to move it aside.
pub fn restore(path: &Path, discard_bad_state: bool) -> Result<Vec<AppRecord>, String> {
    let file =
        snapshot::resolve(path).map_err(|e| format!("state file {}: {e}", path.display()))?;
    // Read first, so that a path that is not a file is refused before anything is written
    // beside it.
    let read = snapshot::read(path);
    if !matches!(read, Err(BadState::NotAFile(_))) {
        check_writable(&file)
            .map_err(|e| format!("state file {}: cannot write beside it: {e}", path.display()))?;
    }
    match read {
        Ok(Some(records)) => Ok(records),
        Ok(None) => {
            log::info!("no state file at {} yet; starting empty", path.display());
            Ok(Vec::new())
        }
        Err(BadState::Unreadable(e)) => Err(format!(
            "state file {}: cannot read it: {e}; check its permissions",
            path.display()
        )),
        Err(bad @ BadState::NotAFile(_)) => Err(format!(
            "state file {}: {bad}; give --state the path of a regular file",
            path.display()
        )),
        Err(bad) if discard_bad_state => {
            let aside = snapshot::set_aside(path).map_err(|e| {
                format!(
                    "state file {}: {bad}, and moving it aside failed: {e}",
                    path.display()
                )
            })?;
            log::warn!(
                "state file {}: {bad}; moved it to {} and starting empty",
                path.display(),
                aside.display()
            );
            Ok(Vec::new())
        }
        Err(bad) => Err(format!(
            "state file {}: {bad}; repair or move it, or start with --discard-bad-state to set it \
             aside and start empty",
            path.display()
        )),
    }
}

/// Finds out at start, not at the first snapshot, whether the state file's directory takes
/// files.
fn check_writable(path: &Path) -> io::Result<()> {
    let mut probe_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    probe_name.push(".probe");
    let probe = path.with_file_name(probe_name);
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// Writes every worker's apps to the state file at `path`, one shard at a time: the thread
/// holds one shard's copies, merged over the workers, at once. Returns the apps written.
fn write_snapshot(cluster: &Cluster, path: &Path) -> Result<u64, String> {
    write_shards(path, |shard| cluster.snapshot_shard(shard))
}

/// Writes the stopped workers' tables to the state file, one shard at a time, merged over the
/// workers; returns the apps written.
pub fn write_state<'a>(
    path: &Path,
    tables: impl Iterator<Item = &'a AppTable> + Clone,
) -> Result<u64, String> {
    write_shards(path, |shard| {
        Ok::<_, String>(tables.clone().map(|t| t.shard_records(shard)).collect())
    })
}

/// Writes a state file a shard at a time, each shard's records merged over the workers' copies
/// that `per_worker` gives for it; returns the apps written.
fn write_shards<E: std::fmt::Display>(
    path: &Path,
    mut per_worker: impl FnMut(usize) -> Result<Vec<Vec<AppRecord>>, E>,
) -> Result<u64, String> {
    let mut writer = StateWriter::create(path).map_err(|e| e.to_string())?;
    for shard in 0..SHARDS {
        let records = per_worker(shard).map_err(|e| e.to_string())?;
        writer
            .append(&snapshot::merge_records(records))
            .map_err(|e| e.to_string())?;
    }
    writer.finish().map_err(|e| e.to_string())
}

/// The thread that writes the state file every --snapshot-interval, and when asked. The
/// workers only copy their tables; merging and writing happen here, off the data path.
pub struct Snapshotter {
    pub requests: Sender<SnapshotRequest>,
    thread: JoinHandle<()>,
}

/// What the snapshot thread is asked to do besides its periodic snapshot.
pub enum SnapshotRequest {
    /// Write a snapshot now (SIGHUP, SIGUSR1).
    Now,
    Stop,
}

impl Snapshotter {
    /// Starts the thread: a snapshot of `cluster` to `path` every `interval`.
    pub fn spawn(
        cluster: Cluster,
        path: PathBuf,
        interval: Duration,
        counters: Arc<SnapshotCounters>,
    ) -> Result<Snapshotter, String> {
        let (requests, requested) = crossbeam_channel::bounded(4);
        let thread = thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                // Merging and writing a large state take seconds of CPU; under full load they
                // wait for the workers, not the other way round.
                if let Err(e) = socket::lower_thread_priority() {
                    log::warn!("snapshot thread keeps its priority: {e}");
                }
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout)
                | Ok(SnapshotRequest::Now) = requested.recv_timeout(interval)
                {
                    let started = Instant::now();
                    match write_snapshot(&cluster, &path) {
                        Ok(apps) => counters.record_success(apps, started.elapsed()),
                        Err(e) => {
                            counters.record_failure();
                            log::error!("snapshot to {} failed: {e}", path.display());
                        }
                    }
                }
            })
            .map_err(|e| format!("spawn snapshot thread: {e}"))?;
        Ok(Snapshotter { requests, thread })
    }

    /// Stops the thread, after the snapshot in progress if there is one.
    pub fn stop(self) {
        let _ = self.requests.send(SnapshotRequest::Stop);
        let _ = self.thread.join();
    }
}
