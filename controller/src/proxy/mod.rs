//! The L7 proxy: `http` enforces HTTP/1.1 per request, `listener` is its transparent edge in
//! the node namespace, `policy` is the view of policy the engine publishes to it.

pub mod http;
pub mod listener;
pub mod policy;
