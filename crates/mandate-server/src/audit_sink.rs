//! Audit sinks: copies of the trail that a node writes out, declared in its config file only
//! (never over the API). Each sink is a task that reads the node's own stored trail from its
//! cursor, writes JSON lines, syncs them, and only then moves its cursor (a file beside the
//! node's data). A sink that fails or stalls holds up nothing but itself: it reports its
//! error and lag, waits, and resumes from its cursor.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mandate_core::audit;
use mandate_raft::Node;
use serde::{Deserialize, Serialize};

use crate::audit_service::records_after;

/// Records written per step.
pub const SINK_CHUNK: usize = 512;
/// Longest wait between retries of a failing sink.
pub const SINK_BACKOFF_MAX_MS: u64 = 30_000;

/// Where a sink writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// JSON lines to a file, rotated by size (`path.1` is the newest rotated file).
    File,
    /// JSON lines to the node's standard output.
    Stdout,
}

/// One sink, as declared in `[[audit.sinks]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique per node; names the cursor file.
    pub name: String,
    pub kind: SinkKind,
    /// The file, for `kind = "file"`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Rotate when the file would grow past this many bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept.
    #[serde(default = "default_keep")]
    pub keep: u32,
}

fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_keep() -> u32 {
    10
}

impl SinkConfig {
    /// Checks the declaration; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(format!(
                "sink name {:?} must be 1 to 64 letters, digits, '-' or '_'",
                self.name
            ));
        }
        match (&self.kind, &self.path) {
            (SinkKind::File, None) => {
                return Err(format!("sink {:?} of kind file needs a path", self.name))
            }
            (SinkKind::Stdout, Some(_)) => {
                return Err(format!(
                    "sink {:?} writes to stdout and takes no path",
                    self.name
                ))
            }
            _ => {}
        }
        if self.max_bytes < 4096 {
            return Err(format!("sink {:?}: max_bytes is at least 4096", self.name));
        }
        Ok(())
    }
}

/// What a sink reports about itself.
#[derive(Debug, Clone, Default)]
pub struct SinkState {
    pub name: String,
    /// The last record written and synced.
    pub position: Option<(u64, u32)>,
    pub written: u64,
    pub last_error: String,
}

/// The statuses of this node's sinks, shared with the audit service.
pub type SinkStates = Arc<Mutex<Vec<SinkState>>>;

/// Where the sink's output goes.
enum Output {
    File {
        path: PathBuf,
        file: Option<File>,
        size: u64,
        /// The file's size when the cursor last moved: a failed step is cut back to it.
        synced: u64,
        max_bytes: u64,
        keep: u32,
    },
    Stdout,
}

impl Output {
    fn new(config: &SinkConfig) -> Self {
        match (&config.kind, &config.path) {
            (SinkKind::File, Some(path)) => Output::File {
                path: path.clone(),
                file: None,
                size: 0,
                synced: 0,
                max_bytes: config.max_bytes,
                keep: config.keep,
            },
            _ => Output::Stdout,
        }
    }

    /// Shifts `path.N` to `path.N+1` (dropping the oldest) and `path` to `path.1`.
    fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
        if keep == 0 {
            return std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(numbered(keep));
        for n in (1..keep).rev() {
            if numbered(n).exists() {
                std::fs::rename(numbered(n), numbered(n + 1))?;
            }
        }
        std::fs::rename(path, numbered(1))
    }

    /// The lines written so far are accounted for by the cursor.
    fn committed(&mut self) {
        if let Output::File { size, synced, .. } = self {
            *synced = *size;
        }
    }

    /// After a failed write: cuts the file back to what was synced, so no partial line stays
    /// and the retry writes each record once.
    fn recover(&mut self) {
        if let Output::File {
            path,
            file,
            size,
            synced,
            ..
        } = self
        {
            *file = None;
            if let Ok(f) = OpenOptions::new().write(true).open(&*path) {
                if f.metadata().is_ok_and(|m| m.len() > *synced) {
                    let _ = f.set_len(*synced).and_then(|()| f.sync_all());
                }
            }
            *size = *synced;
        }
    }

    /// Writes the lines and makes them durable.
    fn write(&mut self, lines: &[String]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                for line in lines {
                    writeln!(out, "{line}")?;
                }
                out.flush()
            }
            Output::File {
                path,
                file,
                size,
                synced,
                max_bytes,
                keep,
            } => {
                for line in lines {
                    let bytes = line.len() as u64 + 1;
                    if file.is_none() {
                        let f = OpenOptions::new().create(true).append(true).open(&*path)?;
                        *size = f.metadata()?.len();
                        *synced = *size;
                        *file = Some(f);
                    }
                    if *size > 0 && *size + bytes > *max_bytes {
                        if let Some(f) = file.take() {
                            f.sync_all()?;
                        }
                        Self::rotate(path, *keep)?;
                        *file = Some(OpenOptions::new().create(true).append(true).open(&*path)?);
                        *size = 0;
                        *synced = 0;
                    }
                    if let Some(f) = file.as_mut() {
                        writeln!(f, "{line}")?;
                        *size += bytes;
                    }
                }
                match file {
                    Some(f) => f.sync_data(),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The position of the last whole record in a sink file, after cutting off a torn last line.
fn last_in_file(path: &Path) -> std::io::Result<Option<(u64, u32)>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let window = len.min(1024 * 1024);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(usize::try_from(window).unwrap_or(0));
    file.read_to_end(&mut tail)?;
    let whole = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if whole < tail.len() {
        // A line cut short by a crash: drop it; its record is written again.
        file.set_len(len - window + whole as u64)?;
        file.sync_all()?;
    }
    let last = tail[..whole]
        .split(|b| *b == b'\n')
        .rev()
        .find(|l| !l.is_empty())
        .and_then(|l| serde_json::from_slice::<serde_json::Value>(l).ok());
    Ok(last.and_then(|v| {
        let index = v["log_index"].as_u64()?;
        let sequence = u32::try_from(v["sequence"].as_u64()?).ok()?;
        Some((index, sequence))
    }))
}

/// Where a file sink really stands after a restart: records written after the cursor last
/// moved (the node stopped between the two) are not written twice.
fn resume_file(path: &Path, keep: u32, cursor: Option<(u64, u32)>) -> Option<(u64, u32)> {
    let rotated = PathBuf::from(format!("{}.1", path.display()));
    let candidates = [path.to_path_buf(), rotated];
    let written = candidates
        .iter()
        .take(if keep > 0 { 2 } else { 1 })
        .find_map(|p| last_in_file(p).ok().flatten());
    match (cursor, written) {
        (Some(c), Some(w)) => Some(c.max(w)),
        (c, w) => c.or(w),
    }
}

fn cursor_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("audit-sinks").join(format!("{name}.cursor"))
}

fn read_cursor(path: &Path) -> Option<(u64, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (index, sequence) = text.trim().split_once('.')?;
    Some((index.parse().ok()?, sequence.parse().ok()?))
}

fn write_cursor(path: &Path, at: (u64, u32)) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("partial");
    let mut f = File::create(&partial)?;
    writeln!(f, "{}.{}", at.0, at.1)?;
    f.sync_all()?;
    std::fs::rename(&partial, path)
}

fn update(states: &SinkStates, index: usize, change: impl FnOnce(&mut SinkState)) {
    if let Ok(mut s) = states.lock() {
        if let Some(state) = s.get_mut(index) {
            change(state);
        }
    }
}

/// Runs one sink until the node stops.
pub async fn run(
    node: Arc<Node>,
    config: SinkConfig,
    data_dir: PathBuf,
    states: SinkStates,
    index: usize,
) {
    let cursor_file = cursor_path(&data_dir, &config.name);
    let mut cursor = read_cursor(&cursor_file);
    if let (SinkKind::File, Some(path)) = (&config.kind, &config.path) {
        cursor = resume_file(path, config.keep, cursor);
    }
    update(&states, index, |s| s.position = cursor);
    let mut output = Output::new(&config);
    let mut applied = node.view.applied_watch();
    let mut backoff_ms = 250;
    loop {
        applied.borrow_and_update();
        let step = records_after(&node, cursor, SINK_CHUNK)
            .map_err(|e| e.to_string())
            .and_then(|records| {
                if records.is_empty() {
                    return Ok(0);
                }
                let lines: Vec<String> = records
                    .iter()
                    .map(|r| audit::to_json(r).to_string())
                    .collect();
                output.write(&lines).map_err(|e| e.to_string())?;
                let last = records.last().map(|r| (r.log_index, r.sequence));
                if let Some(at) = last {
                    write_cursor(&cursor_file, at).map_err(|e| e.to_string())?;
                    output.committed();
                    cursor = Some(at);
                }
                Ok(records.len())
            });
        match step {
            Ok(n) => {
                backoff_ms = 250;
                update(&states, index, |s| {
                    s.position = cursor;
                    s.written += n as u64;
                    s.last_error.clear();
                });
                if n == SINK_CHUNK {
                    continue;
                }
                if applied.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(sink = %config.name, error = %e, "audit sink failed; it will retry from its cursor");
                update(&states, index, |s| s.last_error = e);
                output.recover();
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(SINK_BACKOFF_MAX_MS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_the_last_whole_record_found() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("trail.jsonl");
        std::fs::write(
            &path,
            "{\"log_index\":3,\"sequence\":0}\n{\"log_index\":4,\"sequence\":1}\n{\"log_ind",
        )
        .expect("write");
        assert_eq!(last_in_file(&path).expect("read"), Some((4, 1)));
        let kept = std::fs::read_to_string(&path).expect("read back");
        assert!(kept.ends_with("\"sequence\":1}\n"), "{kept}");
        assert_eq!(resume_file(&path, 10, Some((3, 0))), Some((4, 1)));
        assert_eq!(resume_file(&path, 10, Some((9, 0))), Some((9, 0)));
        assert_eq!(last_in_file(&dir.path().join("none")).expect("read"), None);
    }
}
