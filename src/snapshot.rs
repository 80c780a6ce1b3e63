//! The state file: a versioned, checksummed image of every app the server knows, written
//! atomically (temporary file, fsync, rename, fsync of the directory) and read back on start.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! magic   8 bytes  "IPEVSNAP"
//! version u32      FORMAT_VERSION
//! length  u64      bytes of the body
//! body             apps u64, then per app: sha [u8; 32], events u64, flags u8
//!                  (bit 0: ips truncated), ips u32, then (ip u32, events u64) per ip
//! crc32   u32      CRC-32 (IEEE) of the body
//! ```
//!
//! The records are merged over workers before they are written, so a file does not depend on
//! how many workers wrote it or will read it. A [`StateWriter`] streams them to the file a
//! slice at a time (one shard of the tables), computing the checksum as the bytes go, so that
//! writing a state of any size takes only a slice's worth of memory: the app count and the
//! body length, known only at the end, are written into the header's place then, and the
//! checksum of the whole body is the count's combined with the rest's. This module never
//! touches a worker.
//!
//! A state path that is a symbolic link names the file it points to: that file is read and
//! replaced, next to it, and the link stays. Anything but a regular file (a directory, a
//! FIFO, a device) is refused, and a read takes no more than the header declares.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{AppRecord, Partial};
use crate::wire::AppKey;

const MAGIC: &[u8; 8] = b"IPEVSNAP";
pub const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 8;
const APP_BYTES: usize = 32 + 8 + 1 + 4;
const IP_BYTES: usize = 4 + 8;

/// What the snapshot thread publishes for `/metrics`.
#[derive(Debug, Default)]
pub struct SnapshotCounters {
    pub taken: AtomicU64,
    pub failed: AtomicU64,
    pub last_apps: AtomicU64,
    pub last_duration_ns: AtomicU64,
    /// When the last successful snapshot was written, in seconds since the Unix epoch.
    pub last_success_unix_s: AtomicU64,
}

impl SnapshotCounters {
    pub fn record_success(&self, apps: u64, took: std::time::Duration) {
        self.taken.fetch_add(1, Ordering::Relaxed);
        self.last_apps.store(apps, Ordering::Relaxed);
        self.last_duration_ns.store(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.last_success_unix_s.store(now_s, Ordering::Relaxed);
    }

    pub fn record_failure(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a state file could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum BadState {
    Unreadable(String),
    /// The path names a directory, a FIFO, a device or a socket; the kind is given.
    NotAFile(&'static str),
    NotAStateFile,
    WrongVersion(u32),
    Truncated,
    ChecksumMismatch,
    Malformed(&'static str),
}

impl std::fmt::Display for BadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadState::Unreadable(e) => write!(f, "cannot read it: {e}"),
            BadState::NotAFile(kind) => write!(f, "it is a {kind}, not a regular file"),
            BadState::NotAStateFile => f.write_str("it is not an ipevents state file"),
            BadState::WrongVersion(v) => {
                write!(
                    f,
                    "it has format version {v}; this server reads version {FORMAT_VERSION}"
                )
            }
            BadState::Truncated => f.write_str("it is truncated"),
            BadState::ChecksumMismatch => f.write_str("its checksum does not match (corrupt)"),
            BadState::Malformed(what) => write!(f, "it is malformed ({what})"),
        }
    }
}

/// Adds up the records of several workers into one record per app.
pub fn merge_records(per_worker: impl IntoIterator<Item = Vec<AppRecord>>) -> Vec<AppRecord> {
    let mut merged: HashMap<AppKey, Vec<Partial>> = HashMap::new();
    for records in per_worker {
        for record in records {
            merged.entry(record.app).or_default().push(record.partial);
        }
    }
    let mut records: Vec<AppRecord> = merged
        .into_iter()
        .map(|(app, partials)| AppRecord {
            app,
            partial: crate::store::merge_partials(partials),
        })
        .collect();
    records.sort_unstable_by_key(|r| r.app);
    records
}

/// Serializes records into the file format, in memory. For tests; the server streams them
/// with a [`StateWriter`].
pub fn encode(records: &[AppRecord]) -> Vec<u8> {
    let mut body = (records.len() as u64).to_le_bytes().to_vec();
    for record in records {
        encode_record(&mut body, record);
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out
}

/// Appends one app in the body's layout.
fn encode_record(out: &mut Vec<u8>, record: &AppRecord) {
    out.reserve(APP_BYTES + record.partial.ips.len() * IP_BYTES);
    out.extend_from_slice(&record.app.0);
    out.extend_from_slice(&record.partial.events.to_le_bytes());
    out.push(u8::from(record.partial.ips_truncated));
    out.extend_from_slice(&(record.partial.ips.len() as u32).to_le_bytes());
    for &(ip, events) in &record.partial.ips {
        out.extend_from_slice(&ip.to_le_bytes());
        out.extend_from_slice(&events.to_le_bytes());
    }
}

/// A state file being written: records go to a temporary file beside the state file as they
/// come, and [`finish`](StateWriter::finish) puts it in the state file's place atomically (a
/// crash leaves either the old file or the new one). Dropped unfinished, it removes the
/// temporary file.
pub struct StateWriter {
    path: PathBuf,
    temporary: PathBuf,
    file: File,
    /// Whether the file is in the state file's place; until then, dropping the writer
    /// removes it.
    renamed: bool,
    /// The checksum of the body after the app count, so far.
    crc: crc32fast::Hasher,
    body_bytes: u64,
    apps: u64,
    /// The encoding of the records being appended, reused.
    buffer: Vec<u8>,
}

/// Where the header's body length is, and the body's app count after it.
const LENGTH_OFFSET: u64 = (MAGIC.len() + 4) as u64;

impl StateWriter {
    /// Starts a state file at `path` (a link's target), empty so far.
    pub fn create(path: &Path) -> io::Result<StateWriter> {
        let path = resolve(path)?;
        let temporary = sibling(&path, "tmp");
        let file = File::create(&temporary)?;
        // From here on, dropping the writer removes the temporary file.
        let mut writer = StateWriter {
            path,
            temporary,
            file,
            renamed: false,
            crc: crc32fast::Hasher::new(),
            body_bytes: 8,
            apps: 0,
            buffer: Vec::new(),
        };
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // The body's length, then its app count: written again at the end.
        header.extend_from_slice(&[0; 16]);
        writer.file.write_all(&header)?;
        Ok(writer)
    }

    /// Appends records, in one write; an app may come only once in a file.
    pub fn append(&mut self, records: &[AppRecord]) -> io::Result<()> {
        self.buffer.clear();
        for record in records {
            encode_record(&mut self.buffer, record);
        }
        self.file.write_all(&self.buffer)?;
        self.crc.update(&self.buffer);
        self.body_bytes += self.buffer.len() as u64;
        self.apps += records.len() as u64;
        Ok(())
    }

    /// Completes the header and the checksum, syncs, and renames the file into place;
    /// returns the apps written.
    pub fn finish(mut self) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let file = &mut self.file;
        let count = self.apps.to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&count);
        crc.combine(&self.crc);
        file.write_all(&crc.finalize().to_le_bytes())?;
        file.seek(SeekFrom::Start(LENGTH_OFFSET))?;
        file.write_all(&self.body_bytes.to_le_bytes())?;
        file.write_all(&count)?;
        file.sync_all()?;
        fs::rename(&self.temporary, &self.path)?;
        self.renamed = true;
        // The rename is durable only once the directory entry is.
        let directory = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(directory)?.sync_all()?;
        Ok(self.apps)
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.temporary);
        }
    }
}

/// Parses the file format; never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Vec<AppRecord>, BadState> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BadState::NotAStateFile);
    }
    let mut reader = Reader(&bytes[MAGIC.len()..]);
    let version = reader.u32().ok_or(BadState::Truncated)?;
    if version != FORMAT_VERSION {
        return Err(BadState::WrongVersion(version));
    }
    let body_len = reader.u64().ok_or(BadState::Truncated)?;
    let body_len = usize::try_from(body_len).map_err(|_| BadState::Truncated)?;
    let body = reader.take(body_len).ok_or(BadState::Truncated)?;
    let crc = reader.u32().ok_or(BadState::Truncated)?;
    if !reader.0.is_empty() {
        return Err(BadState::Malformed("bytes after the checksum"));
    }
    if crc32fast::hash(body) != crc {
        return Err(BadState::ChecksumMismatch);
    }
    let mut reader = Reader(body);
    let apps = reader.u64().ok_or(BadState::Malformed("no app count"))?;
    // Every app takes at least APP_BYTES, which bounds the allocation by the file's size.
    if apps > (body.len() / APP_BYTES) as u64 {
        return Err(BadState::Malformed("app count larger than the file"));
    }
    let mut records = Vec::with_capacity(apps as usize);
    for _ in 0..apps {
        let app = AppKey(
            reader
                .take(32)
                .ok_or(BadState::Malformed("short app"))?
                .try_into()
                .expect("32 bytes"),
        );
        let events = reader.u64().ok_or(BadState::Malformed("short app"))?;
        let flags = reader.take(1).ok_or(BadState::Malformed("short app"))?[0];
        let ip_count = reader.u32().ok_or(BadState::Malformed("short app"))? as usize;
        if ip_count > reader.0.len() / IP_BYTES {
            return Err(BadState::Malformed("ip count larger than the file"));
        }
        let mut ips = Vec::with_capacity(ip_count);
        for _ in 0..ip_count {
            let ip = reader.u32().ok_or(BadState::Malformed("short ip"))?;
            let ip_events = reader.u64().ok_or(BadState::Malformed("short ip"))?;
            ips.push((ip, ip_events));
        }
        records.push(AppRecord {
            app,
            partial: Partial {
                events,
                ips,
                ips_truncated: flags & 1 != 0,
            },
        });
    }
    if !reader.0.is_empty() {
        return Err(BadState::Malformed("bytes after the last app"));
    }
    Ok(records)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The file a state path names: a symbolic link is followed to its last target, which need
/// not exist yet, so that the state is written where the link points and the link is kept.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut path = path.to_path_buf();
    // As many links as the kernel follows before it says ELOOP.
    for _ in 0..40 {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&path)?;
                // A relative target is relative to the link's directory; join keeps an
                // absolute one as it is.
                path = path
                    .parent()
                    .map_or(target.clone(), |dir| dir.join(&target));
            }
            _ => return Ok(path),
        }
    }
    Err(io::Error::other("too many levels of symbolic links"))
}

/// Writes `records` to `path` atomically: a crash leaves either the old file or the new one.
pub fn write(path: &Path, records: &[AppRecord]) -> io::Result<()> {
    let mut writer = StateWriter::create(path)?;
    writer.append(records)?;
    writer.finish().map(drop)
}

/// Reads the state file. `Ok(None)` when there is none yet (a first start).
pub fn read(path: &Path) -> Result<Option<Vec<AppRecord>>, BadState> {
    let unreadable = |e: io::Error| BadState::Unreadable(e.to_string());
    let path = resolve(path).map_err(unreadable)?;
    let kind = match fs::metadata(&path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(e)),
    };
    if !kind.is_file() {
        return Err(BadState::NotAFile(file_kind(kind)));
    }
    // Non-blocking, so that a FIFO put in the file's place cannot hang the start.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(BadState::NotAFile("file that changed while it was opened"));
    }
    decode(&read_bounded(file).map_err(unreadable)?).map(Some)
}

fn file_kind(kind: fs::FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Reads the header, then no more than the body it declares, its checksum, and one byte to
/// find out whether anything follows: a file that grows or never ends costs no more.
fn read_bounded(mut file: impl Read) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES);
    (&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut bytes)?;
    if bytes.len() < HEADER_BYTES || &bytes[..MAGIC.len()] != MAGIC {
        // Too short or foreign: decode says which.
        return Ok(bytes);
    }
    let body_len = u64::from_le_bytes(bytes[12..HEADER_BYTES].try_into().expect("8 bytes"));
    file.take(body_len.saturating_add(4 + 1))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Moves a bad state file aside, next to where it was, and returns its new name. Through a
/// link, the link's target is moved, and the link is kept for the next write.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let path = &resolve(path)?;
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = sibling(path, &format!("bad-{seconds}"));
    fs::rename(path, &aside)?;
    Ok(aside)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8, events: u64, ips: Vec<(u32, u64)>, ips_truncated: bool) -> AppRecord {
        AppRecord {
            app: AppKey([n; 32]),
            partial: Partial {
                events,
                ips,
                ips_truncated,
            },
        }
    }

    #[test]
    fn round_trips() {
        let records = vec![
            record(1, 3, vec![(10, 2), (11, 1)], false),
            record(2, 9, vec![(u32::MAX, 5)], true),
        ];
        assert_eq!(decode(&encode(&records)), Ok(records));
        assert_eq!(decode(&encode(&[])), Ok(vec![]));
    }

    #[test]
    fn merges_workers() {
        let merged = merge_records([
            vec![
                record(2, 1, vec![(7, 1)], false),
                record(1, 2, vec![(5, 2)], false),
            ],
            vec![record(1, 3, vec![(5, 1), (6, 2)], true)],
        ]);
        assert_eq!(
            merged,
            vec![
                record(1, 5, vec![(5, 3), (6, 2)], true),
                record(2, 1, vec![(7, 1)], false)
            ]
        );
    }

    #[test]
    fn refuses_bad_files() {
        let good = encode(&[record(1, 3, vec![(10, 3)], false)]);
        let mut flipped = good.clone();
        flipped[HEADER_BYTES + 10] ^= 1;
        let mut wrong_version = good.clone();
        wrong_version[8] = 9;
        let mut trailing = good.clone();
        trailing.push(0);
        let cases: Vec<(Vec<u8>, BadState)> = vec![
            (vec![], BadState::NotAStateFile),
            (
                b"hello world, not a snapshot".to_vec(),
                BadState::NotAStateFile,
            ),
            (good[..good.len() - 1].to_vec(), BadState::Truncated),
            (good[..HEADER_BYTES + 3].to_vec(), BadState::Truncated),
            (flipped, BadState::ChecksumMismatch),
            (wrong_version, BadState::WrongVersion(9)),
            (trailing, BadState::Malformed("bytes after the checksum")),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(&bytes), Err(want));
        }
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        // A well-formed envelope around a body that claims 2^60 apps.
        let body = (1u64 << 60).to_le_bytes();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        assert_eq!(
            decode(&bytes),
            Err(BadState::Malformed("app count larger than the file"))
        );
    }

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("ipevents-snapshot-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        assert_eq!(read(&path), Ok(None));
        let records = vec![record(4, 1, vec![(1, 1)], false)];
        write(&path, &records).unwrap();
        assert_eq!(read(&path), Ok(Some(records)));
        assert!(!sibling(&path, "tmp").exists());
        let aside = set_aside(&path).unwrap();
        assert!(aside.exists() && !path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_streamed_file_is_the_encoded_one() {
        let dir = Dir::new("streamed");
        let path = dir.0.join("state");
        let slices = [
            vec![record(1, 3, vec![(10, 2), (11, 1)], false)],
            vec![],
            vec![
                record(2, 9, vec![(u32::MAX, 5)], true),
                record(3, 1, vec![(1, 1)], false),
            ],
        ];
        let mut writer = StateWriter::create(&path).unwrap();
        for slice in &slices {
            writer.append(slice).unwrap();
        }
        assert_eq!(writer.finish().unwrap(), 3);
        let all: Vec<AppRecord> = slices.concat();
        assert_eq!(fs::read(&path).unwrap(), encode(&all));
        // Given up half way, it leaves the old file and no temporary one.
        let mut writer = StateWriter::create(&path).unwrap();
        writer.append(&slices[0]).unwrap();
        drop(writer);
        assert_eq!(read(&path), Ok(Some(all)));
        assert!(!sibling(&path, "tmp").exists());
        // A finish that fails (here its rename, onto a directory that is not empty) leaves
        // no temporary file either.
        let blocked = dir.0.join("blocked");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        let mut writer = StateWriter::create(&blocked).unwrap();
        writer.append(&slices[0]).unwrap();
        assert!(writer.finish().is_err());
        assert!(!sibling(&blocked, "tmp").exists());
    }

    /// A fresh directory under the system's temporary one, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir()
                .join(format!("ipevents-snapshot-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Issue 11, item 4: the header says how much to read, whatever follows.
    #[test]
    fn reads_no_more_than_the_header_declares() {
        let good = encode(&[record(1, 3, vec![(10, 3)], false)]);
        assert_eq!(read_bounded(&good[..]).unwrap(), good);
        // An endless stream after a valid file: the read stops one byte past the checksum.
        let endless = (&good[..]).chain(io::repeat(7));
        let bytes = read_bounded(endless).unwrap();
        assert_eq!(bytes.len(), good.len() + 1);
        assert_eq!(
            decode(&bytes),
            Err(BadState::Malformed("bytes after the checksum"))
        );
        // Endless zeros, and an endless header that claims 2^62 bytes of body, end too.
        assert_eq!(read_bounded(io::repeat(0)).unwrap().len(), HEADER_BYTES);
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
        let short = read_bounded(&huge[..]).unwrap();
        assert_eq!(decode(&short), Err(BadState::Truncated));
    }

    /// Issue 11, item 4: a state path that is a link is written where it points; the link
    /// stays a link.
    #[test]
    fn writes_through_a_symlink_and_keeps_it() {
        let dir = Dir::new("symlink");
        let volume = dir.0.join("volume");
        fs::create_dir_all(&volume).unwrap();
        let link = dir.0.join("state");
        let hop = dir.0.join("hop");
        // state -> hop -> volume/state (relative), which does not exist yet.
        std::os::unix::fs::symlink("hop", &link).unwrap();
        std::os::unix::fs::symlink("volume/state", &hop).unwrap();
        assert_eq!(resolve(&link).unwrap(), dir.0.join("volume/state"));
        let records = vec![record(4, 1, vec![(1, 1)], false)];
        write(&link, &records).unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(&hop).unwrap().file_type().is_symlink());
        assert_eq!(read(&volume.join("state")), Ok(Some(records.clone())));
        assert_eq!(read(&link), Ok(Some(records)));
        let aside = set_aside(&link).unwrap();
        assert_eq!(aside.parent(), Some(volume.as_path()));
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(read(&link), Ok(None));
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = Dir::new("kinds");
        assert_eq!(read(&dir.0), Err(BadState::NotAFile("directory")));
        assert_eq!(
            read(Path::new("/dev/zero")),
            Err(BadState::NotAFile("character device"))
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = decode(&bytes);
                let mut framed = MAGIC.to_vec();
                framed.extend_from_slice(&bytes);
                let _ = decode(&framed);
            }
        }
    }
}
