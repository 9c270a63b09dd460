//! Making writes durable. A [`Syncer`] thread runs one sync for every request waiting on it:
//! requests that arrive while a sync runs share the next one (group commit), since one sync
//! makes every earlier write durable. The raft log's sync is `fdatasync` of its last segment
//! file ([`crate::log_store`]); the state store's is fjall's journal persisted with
//! `PersistMode::SyncAll` (its sorted tables are synced by fjall when it writes them).
//! Snapshots are written to their own files with write-fsync-rename.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;

use crate::error::OpenError;

/// The segment size earlier releases gave their sled databases; sled opens one only with the
/// size it was created with, so moving old data needs it.
pub const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

type Waiter = Box<dyn FnOnce(io::Result<()>) + Send>;
/// What one sync does: make every write issued before it durable.
pub type SyncFn = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

/// Handle to a sync thread. When the last handle is dropped the thread finishes its queue and
/// exits, releasing what it syncs.
#[derive(Clone)]
pub struct Syncer {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Inline mode: the sync, run on the caller's thread.
    inline: Option<SyncFn>,
}

/// How a node's writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// A dedicated thread syncs, sharing one sync among every write that arrives meanwhile
    /// (group commit). What servers run.
    #[default]
    GroupCommit,
    /// Each sync runs at once on the calling thread, so no other thread ever wakes a task:
    /// what the deterministic simulation needs (one thread runs every node).
    Inline,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the fsync thread panicked");
            }
        }
    }
}

impl Syncer {
    /// A syncer running `sync` on a thread named `name` (or inline).
    pub fn start(name: &'static str, mode: SyncMode, sync: SyncFn) -> Result<Self, OpenError> {
        if mode == SyncMode::Inline {
            return Ok(Syncer {
                inner: Arc::new(Inner {
                    tx: None,
                    thread: None,
                    inline: Some(sync),
                }),
            });
        }
        let (tx, rx) = mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&*sync, rx))
            .map_err(|e| OpenError::Thread(name, e))?;
        Ok(Syncer {
            inner: Arc::new(Inner {
                tx: Some(tx),
                thread: Some(thread),
                inline: None,
            }),
        })
    }

    /// A syncer that persists the state store's journal to disk.
    pub fn for_state(db: fjall::Database, mode: SyncMode) -> Result<Self, OpenError> {
        Self::start(
            "mandate-stsync",
            mode,
            Box::new(move || {
                db.persist(fjall::PersistMode::SyncAll)
                    .map_err(io::Error::other)
            }),
        )
    }

    /// Whether syncs run on the caller's thread ([`SyncMode::Inline`]): then the node must not
    /// start threads of its own either.
    pub fn is_inline(&self) -> bool {
        self.inner.inline.is_some()
    }

    /// Calls `done` once everything written before this call is durable.
    pub fn after_sync(&self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        if let Some(sync) = &self.inner.inline {
            done(sync());
            return;
        }
        let waiter: Waiter = Box::new(done);
        let unsent = match &self.inner.tx {
            Some(tx) => tx.send(waiter).err().map(|mpsc::SendError(w)| w),
            None => Some(waiter),
        };
        if let Some(waiter) = unsent {
            waiter(Err(io::Error::other("the fsync thread has stopped")));
        }
    }

    /// Waits until everything written before this call is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_sync(move |result| {
            let _ = tx.send(result);
        });
        rx.await
            .map_err(|_| io::Error::other("the fsync thread dropped a request"))?
    }
}

fn run(sync: &(dyn Fn() -> io::Result<()> + Send + Sync), rx: mpsc::Receiver<Waiter>) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        let result = sync();
        if let Err(e) = &result {
            tracing::error!(error = %e, "making writes durable failed");
        }
        for waiter in waiters {
            let shared = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            waiter(shared);
        }
    }
}
