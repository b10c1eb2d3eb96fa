//! Reads flow events from the datapath's ring buffer and hands them on as they arrive.

use std::os::fd::AsRawFd as _;

use aya::maps::{MapData, RingBuf};
use palisade_common::flow::FlowEvent;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::warn;

/// Forwards every event in the ring buffer to `tx` until the receiver goes away.
pub async fn read_events(ring: RingBuf<MapData>, tx: mpsc::Sender<FlowEvent>) {
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
    loop {
        let mut guard = match afd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "polling the flow event ring buffer failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<FlowEvent>() {
                // SAFETY: the datapath writes exactly one FlowEvent per record; the length
                // check above keeps the read in bounds and read_unaligned needs no alignment.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        guard.clear_ready();
        for ev in batch {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}
