//! The agent API: JSON over HTTP/1.1 on a unix socket (curl-able with `--unix-socket`).
//!
//! - `types`: the request and response shapes, a stable documented contract (docs/api.md);
//! - `flow`: flow records and their one-line form; `filter`: hubble-style flow filters;
//! - `client`: what the CLI (and any other client) uses to talk to the agent.
//!
//! The agent's server turns the engine's typed views into these shapes; nothing here knows
//! the engine.

pub mod client;
pub mod filter;
pub mod flow;
pub mod prefilter;
pub mod types;
