//! Background saving with group commit: any number of changes made while a save is in
//! flight are written together by the next one (one registry save, one journal append,
//! one fsync each), so starting 100 services costs a handful of fsyncs, not hundreds.
//! Background saves are paced (at most one per [`PACE`]); a [`Persister::commit`]
//! waiter, which needs durability now, skips the pacing.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry::{Journal, Store};

use crate::core::Core;

/// Least time between two background saves (each writes every stack that changed
/// since the last: 158 KB for a stack of 100 services). 100 ms rather than 50: an `up`
/// of 100 services writes it once in the background instead of twice, and its answer's
/// commit less often waits behind one (measured: 87.9 against 89.7 ms).
pub const PACE: Duration = Duration::from_millis(100);

/// Handle to the persister task.
pub struct Persister {
    wake: async_channel::Sender<()>,
    wake_rx: async_channel::Receiver<()>,
    requested: AtomicU64,
    done: AtomicU64,
    committed: event_listener::Event,
    urgent: AtomicBool,
    urgent_wake: event_listener::Event,
    last_error: Mutex<Option<String>>,
    /// The journal, shared with subscribers that replay older events.
    pub journal: Arc<Mutex<Journal>>,
}

impl Persister {
    /// A persister writing through `journal` (the store is handed to [`run`]).
    pub fn new(journal: Journal) -> Self {
        let (wake, wake_rx) = async_channel::bounded(1);
        Persister {
            wake,
            wake_rx,
            requested: AtomicU64::new(0),
            done: AtomicU64::new(0),
            committed: event_listener::Event::new(),
            urgent: AtomicBool::new(false),
            urgent_wake: event_listener::Event::new(),
            last_error: Mutex::new(None),
            journal: Arc::new(Mutex::new(journal)),
        }
    }

    /// Schedules a save; returns the ticket a [`Persister::commit`] waits for.
    pub fn mark_dirty(&self) -> u64 {
        let ticket = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let _ = self.wake.try_send(());
        ticket
    }

    /// Schedules a save and waits until it (or a later one) is on disk.
    pub async fn commit(&self) -> Result<(), String> {
        self.urgent.store(true, Ordering::Release);
        self.urgent_wake.notify(usize::MAX);
        let ticket = self.mark_dirty();
        loop {
            let listener = self.committed.listen();
            if self.done.load(Ordering::Acquire) >= ticket {
                return match self
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            listener.await;
        }
    }

    /// The last save error, if the last save failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The persister loop; runs for the daemon's lifetime.
pub async fn run(core: Arc<Core>, store: Store) {
    let store = Arc::new(Mutex::new(store));
    let p = &core.persister;
    let mut last_save = Instant::now() - PACE;
    while p.wake_rx.recv().await.is_ok() {
        // Pace background saves; wake early when someone commits.
        let deadline = last_save + PACE;
        loop {
            let listener = p.urgent_wake.listen();
            if p.urgent.load(Ordering::Acquire) || Instant::now() >= deadline {
                break;
            }
            smol::future::or(listener, async {
                smol::Timer::at(deadline).await;
            })
            .await;
        }
        p.urgent.store(false, Ordering::Release);
        last_save = Instant::now();
        let ticket = p.requested.load(Ordering::Acquire);
        let snapshot = core.snapshot();
        let events = core.events.take_unjournaled();
        let (store, journal) = (store.clone(), p.journal.clone());
        // The journal's append and the snapshot's write go at once, each with its own
        // fsync: a commit waits for the slower, not for both in turn. A crash between
        // the two may now leave the journal behind the snapshot too (before, only the
        // other way round); either way a commit is answered only once both are on
        // disk, and subscribers had these events live before either.
        let appended = smol::unblock(move || -> Result<(), String> {
            if events.is_empty() {
                return Ok(());
            }
            let mut j = journal.lock().unwrap_or_else(|e| e.into_inner());
            j.append(&events).map_err(|e| e.to_string())
        });
        let saved = smol::unblock(move || -> Result<(), String> {
            let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
            s.save(&snapshot).map_err(|e| e.to_string())
        });
        let (appended, saved) = smol::future::zip(appended, saved).await;
        let result = appended.and(saved);
        if let Err(e) = &result {
            tracing::error!("cannot save the registry: {e}");
        }
        *p.last_error.lock().unwrap_or_else(|e| e.into_inner()) = result.err();
        p.done.store(ticket, Ordering::Release);
        p.committed.notify(usize::MAX);
    }
}
