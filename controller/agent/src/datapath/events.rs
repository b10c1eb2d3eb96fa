//! Reads flow events from the datapath's ring buffer and hands them on. The programs wake the
//! agent only once a batch is pending (`FLOW_EVENTS_WAKEUP_BYTES`); otherwise the ring is
//! drained every `FLOW_EVENTS_DRAIN_MS`, so a burst of new connections costs no wakeup per
//! event.

use std::os::fd::AsRawFd as _;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use palisade_common::flow::FlowEvent;
use palisade_common::maps::FLOW_EVENTS_DRAIN_MS;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tracing::warn;

/// How long a reader of the flow store waits for a flush before answering without it.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// What the ring reader hands on: events, and the points at which a flush asked for is done.
#[derive(Debug)]
pub enum RingItem {
    Event(FlowEvent),
    /// Everything before this is handed on; the consumer answers once it has stored it.
    Flushed(oneshot::Sender<()>),
}

/// Lets readers of the flow store (observe, the connection log) see every flow written before
/// they asked, although the datapath's ring is drained on a timer and the proxy's reports are
/// stored by a task of their own: each source of flows answers a flush once it has stored
/// what came before it.
#[derive(Clone, Debug)]
pub struct Flush(Vec<mpsc::Sender<oneshot::Sender<()>>>);

impl Flush {
    /// A handle and the requests it sends, for `read_events`.
    pub fn new() -> (Flush, mpsc::Receiver<oneshot::Sender<()>>) {
        let mut flush = Flush(Vec::new());
        let requests = flush.source();
        (flush, requests)
    }

    /// Adds a source of flows: the requests it must answer.
    pub fn source(&mut self) -> mpsc::Receiver<oneshot::Sender<()>> {
        let (tx, rx) = mpsc::channel(64);
        self.0.push(tx);
        rx
    }

    /// Returns once every source has stored what it had before the call, or after
    /// `FLUSH_WAIT` (a source that does not run is skipped): a slow flush delays an answer,
    /// never loses one.
    pub async fn wait(&self) {
        let all = async {
            for source in &self.0 {
                let (done, stored) = oneshot::channel();
                if source.send(done).await.is_ok() {
                    let _ = stored.await;
                }
            }
        };
        let _ = tokio::time::timeout(FLUSH_WAIT, all).await;
    }
}

/// Moves every complete record in the ring into `batch`.
fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<FlowEvent>) {
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<FlowEvent>() {
            // SAFETY: the datapath writes exactly one FlowEvent per record; the length check
            // above keeps the read in bounds and read_unaligned needs no alignment.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
    }
}

/// Forwards every event in the ring buffer to `tx` until the receiver goes away: when woken,
/// on a timer, and at once for a flush (followed by its `Flushed` marker).
pub async fn read_events(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<RingItem>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let fd = ring.as_raw_fd();
    // SAFETY: the ring buffer owns its map fd and keeps it open (and the same) for as long as
    // the AsyncFd owns the ring buffer.
    let mut afd = match unsafe { AsyncFd::register(ring) } {
        Ok(a) => a,
        Err(e) => {
            warn!(fd, error = %e, "cannot poll the flow event ring buffer; flows will be missing");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(FLOW_EVENTS_DRAIN_MS));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    loop {
        let (woken, flushed) = tokio::select! {
            ready = afd.readable_mut() => match ready {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &mut batch);
                    guard.clear_ready();
                    (true, None)
                }
                Err(e) => {
                    warn!(error = %e, "polling the flow event ring buffer failed");
                    return;
                }
            },
            _ = tick.tick() => (false, None),
            Some(done) = flushes.recv() => (false, Some(done)),
        };
        if !woken {
            drain(afd.get_mut(), &mut batch);
        }
        let marker = flushed.map(RingItem::Flushed);
        for item in batch.drain(..).map(RingItem::Event).chain(marker) {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    }
}
