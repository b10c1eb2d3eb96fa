//! Palisade's DNS proxy. The datapath redirects DNS (UDP and TCP) of endpoints whose egress
//! policy has `rules.dns` here, transparently: the proxy sees the client and the server it
//! asked. `message` reads and writes DNS messages (with hickory-proto) and is fuzzed on its
//! own; `server` is the edge: the transparent sockets in the node namespace, the upstream leg
//! to the original server, and the order that makes `toFQDNs` safe: an answer's addresses are
//! handed to the [`Learner`](server::Learner) (the engine, which writes them into the maps)
//! and only then is the answer released to the client.
//!
//! Like the HTTP proxy, it depends on the policy crate and the ABI crate only: the policy
//! arrives over a `watch` channel, and what it did is reported to an
//! [`Observer`](server::Observer).
#![forbid(unsafe_code)]

pub mod message;
pub mod server;
