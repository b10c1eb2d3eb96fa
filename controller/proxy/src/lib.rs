//! Palisade's L7 proxy. `http` enforces HTTP/1.1 per request and is fuzzed on its own;
//! `listener` is the transparent edge in the node namespace that the datapath steers redirected
//! connections to; `pool` keeps idle upstream connections for later client connections;
//! `policy` is the proxy's view of the policy the engine publishes.
//!
//! The proxy depends on the policy crate and the ABI crate only: it is handed the policy over a
//! `watch` channel and reports what it did to an [`Observer`](listener::Observer), which the
//! agent turns into flows and metrics.
#![forbid(unsafe_code)]

pub mod http;
pub mod listener;
pub mod policy;
pub mod pool;
