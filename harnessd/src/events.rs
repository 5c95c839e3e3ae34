//! The event bus: assigns `seq`, keeps recent events for replay, queues them for the
//! journal, and fans them out to subscribers without ever blocking on a slow one.
//!
//! Each connection has one bounded event queue. Publishing never waits: when a queue is
//! full, the connection is marked lagged from that `seq`, receives nothing more until
//! its writer has drained the queue, and then gets one `daemon.lagged` message telling
//! it where to replay from.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use protocol::events::{Event, EventKind};
use protocol::methods::SubscribeParams;

use crate::core::now;

/// Events kept in memory for replay; older ones are read from the journal file.
const RECENT_EVENTS: usize = 8192;

/// Journaled events read at a time for a replay.
const JOURNAL_BATCH: usize = 1024;

/// Per-connection event queue capacity.
pub const CONNECTION_EVENT_QUEUE: usize = 1024;

/// The sending side of a connection's event queue.
#[derive(Clone)]
pub struct EventSink {
    /// Pre-serialised events.
    pub tx: async_channel::Sender<Arc<str>>,
    /// First seq the connection missed, 0 when it has missed nothing.
    pub lagged_from: Arc<AtomicU64>,
}

struct Subscription {
    id: u64,
    conn: u64,
    topics: Vec<String>,
    stack: Option<String>,
    sink: EventSink,
}

impl Subscription {
    fn wants(&self, kind: &EventKind) -> bool {
        (self.topics.is_empty() || self.topics.iter().any(|t| t == kind.topic()))
            && match (&self.stack, kind.stack()) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    }
}

struct Bus {
    next_seq: u64,
    next_sub: u64,
    recent: VecDeque<(Event, Arc<str>)>,
    unjournaled: Vec<Event>,
    subs: Vec<Subscription>,
}

/// The event bus.
pub struct EventBus {
    bus: Mutex<Bus>,
}

impl EventBus {
    /// A bus whose next event gets `last_seq + 1`.
    pub fn new(last_seq: u64) -> Self {
        EventBus {
            bus: Mutex::new(Bus {
                next_seq: last_seq + 1,
                next_sub: 1,
                recent: VecDeque::new(),
                unjournaled: Vec::new(),
                subs: Vec::new(),
            }),
        }
    }

    /// Latest seq published.
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// Publishes an event; returns its seq.
    pub fn publish(&self, kind: EventKind) -> u64 {
        let mut bus = self.lock();
        let seq = bus.next_seq;
        bus.next_seq += 1;
        let event = Event {
            seq,
            time: now(),
            kind,
        };
        let text: Arc<str> = serde_json::to_string(&event)
            .expect("events serialize")
            .into();
        bus.subs.retain(|s| !s.sink.tx.is_closed());
        for sub in bus.subs.iter().filter(|s| s.wants(&event.kind)) {
            if sub.sink.lagged_from.load(Ordering::Acquire) != 0 {
                continue;
            }
            if sub.sink.tx.try_send(text.clone()).is_err() {
                // Full: from here on the client replays from the journal.
                let _ = sub.sink.lagged_from.compare_exchange(
                    0,
                    seq,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        if bus.recent.len() == RECENT_EVENTS {
            bus.recent.pop_front();
        }
        bus.recent.push_back((event.clone(), text));
        bus.unjournaled.push(event);
        seq
    }

    /// Events not yet written to the journal (taken by the persister).
    pub fn take_unjournaled(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().unjournaled)
    }

    /// Adds a subscription for connection `conn`. Events with `seq >= since` are queued
    /// first: older than memory through `journal_replay(from, until, limit)` (at most
    /// `limit` journaled events from `from`, below `until`), read a batch at a time and
    /// only as far as the connection's queue takes. Returns the subscription id and the
    /// latest seq; a journal that cannot be read is an error (a silent gap would be
    /// worse).
    pub fn subscribe(
        &self,
        conn: u64,
        params: &SubscribeParams,
        sink: &EventSink,
        mut journal_replay: impl FnMut(u64, u64, usize) -> Result<Vec<Event>, String>,
    ) -> Result<(u64, u64), String> {
        let mut bus = self.lock();
        let id = bus.next_sub;
        bus.next_sub += 1;
        let sub = Subscription {
            id,
            conn,
            topics: params.topics.clone(),
            stack: params.stack.clone(),
            sink: sink.clone(),
        };
        if let Some(since) = params.since {
            let oldest_recent = bus.recent.front().map_or(bus.next_seq, |(e, _)| e.seq);
            let mut replay: Vec<(u64, Arc<str>)> = Vec::new();
            // What the queue can take, and one more to tell that it overflowed.
            let room = sink.tx.capacity().unwrap_or(usize::MAX).saturating_add(1);
            let mut from = since;
            // Older than memory: the journal has it (minus what is not yet flushed,
            // which is in memory anyway).
            // Cut short (the queue is full) with journaled events still unread: memory's
            // turn comes after them, in a later round. (A journal with nothing more
            // below memory, or nothing before `since` at all, is not cut.)
            let mut journal_cut = false;
            while from < oldest_recent {
                if replay.len() >= room {
                    journal_cut = true;
                    break;
                }
                let batch = journal_replay(from, oldest_recent, JOURNAL_BATCH)?;
                let Some(last) = batch.last() else { break };
                from = last.seq + 1;
                for ev in batch.into_iter().filter(|e| sub.wants(&e.kind)) {
                    let text = serde_json::to_string(&ev).expect("events serialize");
                    replay.push((ev.seq, text.into()));
                }
            }
            if !journal_cut {
                for (ev, text) in bus.recent.iter().filter(|(e, _)| e.seq >= since) {
                    if sub.wants(&ev.kind) {
                        replay.push((ev.seq, text.clone()));
                    }
                }
            }
            // A replay longer than the queue goes a queue at a time: the lag notice
            // names the first event that did not fit, and the client asks again from
            // there (naming `since` again would replay the same queueful for ever).
            let mut next = journal_cut.then_some(from);
            for (seq, text) in replay {
                if sink.tx.try_send(text).is_err() {
                    next = Some(seq);
                    break;
                }
            }
            // The writer may drain the queue while it fills, so all of a cut replay can
            // fit: the notice then names the first event not read.
            if let Some(next) = next {
                let _ =
                    sink.lagged_from
                        .compare_exchange(0, next, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        let last = bus.next_seq - 1;
        bus.subs.push(sub);
        Ok((id, last))
    }

    /// Removes a subscription of `conn`; false when there was none.
    pub fn unsubscribe(&self, conn: u64, id: u64) -> bool {
        let mut bus = self.lock();
        let before = bus.subs.len();
        bus.subs.retain(|s| !(s.conn == conn && s.id == id));
        bus.subs.len() != before
    }

    /// Removes every subscription of a connection.
    pub fn drop_connection(&self, conn: u64) {
        self.lock().subs.retain(|s| s.conn != conn);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::events::Reconciled;

    fn sink(capacity: usize) -> (EventSink, async_channel::Receiver<Arc<str>>) {
        let (tx, rx) = async_channel::bounded(capacity);
        let sink = EventSink {
            tx,
            lagged_from: Arc::new(AtomicU64::new(0)),
        };
        (sink, rx)
    }

    /// An event of no consequence.
    fn reconciled() -> EventKind {
        EventKind::DaemonReconciled(Reconciled { fixes: Vec::new() })
    }

    fn publish_many(bus: &EventBus, n: u64) {
        for _ in 0..n {
            bus.publish(reconciled());
        }
    }

    fn seqs(rx: &async_channel::Receiver<Arc<str>>) -> Vec<u64> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|t| serde_json::from_str::<Event>(&t).unwrap().seq)
            .collect()
    }

    /// A replay longer than the queue goes a queueful at a time, each lag notice naming
    /// where the next one starts, so a client asking again from there gets everything.
    #[test]
    fn a_long_replay_resumes_where_the_queue_filled() {
        let bus = EventBus::new(0);
        publish_many(&bus, 250);
        let mut got = Vec::new();
        let mut since = 1;
        for conn in 1.. {
            let (sink, rx) = sink(100);
            let params = SubscribeParams {
                since: Some(since),
                ..Default::default()
            };
            bus.subscribe(conn, &params, &sink, |_, _, _| Ok(Vec::new()))
                .unwrap();
            got.extend(seqs(&rx));
            since = sink.lagged_from.load(Ordering::Acquire);
            bus.drop_connection(conn);
            if since == 0 {
                break;
            }
            assert_eq!(
                since,
                got.last().unwrap() + 1,
                "resumes after the last one sent"
            );
        }
        assert_eq!(got, (1..=250).collect::<Vec<_>>());
    }

    /// Older than memory, a replay reads the journal a batch at a time and stops once
    /// the queue is full; a journal that cannot be read fails the subscription.
    #[test]
    fn a_replay_from_the_journal_reads_only_what_the_queue_takes() {
        let bus = EventBus::new(0);
        let total = RECENT_EVENTS as u64 + 5000;
        publish_many(&bus, total);
        let journal: Vec<Event> = (1..=total)
            .map(|seq| Event {
                seq,
                time: now(),
                kind: reconciled(),
            })
            .collect();
        let (queue, rx) = sink(100);
        let mut reads = 0;
        let params = SubscribeParams {
            since: Some(1),
            ..Default::default()
        };
        bus.subscribe(1, &params, &queue, |from, until, limit| {
            reads += 1;
            Ok(journal
                .iter()
                .filter(|e| e.seq >= from && e.seq < until)
                .take(limit)
                .cloned()
                .collect())
        })
        .unwrap();
        assert_eq!(seqs(&rx), (1..=100).collect::<Vec<_>>());
        assert_eq!(queue.lagged_from.load(Ordering::Acquire), 101);
        assert_eq!(reads, 1, "read more of the journal than the queue takes");
        let (other, _rx) = sink(100);
        let failed = bus.subscribe(2, &params, &other, |_, _, _| Err("disk on fire".into()));
        assert_eq!(failed, Err("disk on fire".to_owned()));
    }

    /// `since` older than anything (0) or than the journal holds: what there is comes,
    /// and no lag notice (the replay was not cut short).
    #[test]
    fn a_replay_from_before_the_first_event_is_not_a_lag() {
        let bus = EventBus::new(0);
        publish_many(&bus, 5);
        let (queue, rx) = sink(100);
        let params = SubscribeParams {
            since: Some(0),
            ..Default::default()
        };
        // The journal has only what memory has too (seq >= 1): nothing below `until`.
        bus.subscribe(1, &params, &queue, |_, _, _| Ok(Vec::new()))
            .unwrap();
        assert_eq!(seqs(&rx), (1..=5).collect::<Vec<_>>());
        assert_eq!(queue.lagged_from.load(Ordering::Acquire), 0);
    }

    /// A live subscriber whose queue is full is marked lagged from the first event it
    /// missed; publishing goes on for everyone else.
    #[test]
    fn a_full_queue_marks_the_subscriber_lagged_and_blocks_no_one() {
        let bus = EventBus::new(0);
        let (slow, slow_rx) = sink(10);
        let (fast, fast_rx) = sink(1000);
        bus.subscribe(1, &SubscribeParams::default(), &slow, |_, _, _| {
            Ok(Vec::new())
        })
        .unwrap();
        bus.subscribe(2, &SubscribeParams::default(), &fast, |_, _, _| {
            Ok(Vec::new())
        })
        .unwrap();
        publish_many(&bus, 50);
        assert_eq!(seqs(&slow_rx), (1..=10).collect::<Vec<_>>());
        assert_eq!(slow.lagged_from.load(Ordering::Acquire), 11);
        assert_eq!(seqs(&fast_rx), (1..=50).collect::<Vec<_>>());
        assert_eq!(fast.lagged_from.load(Ordering::Acquire), 0);
    }
}
