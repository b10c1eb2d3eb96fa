//! The agent API: JSON over HTTP/1.1 on a unix socket (curl-able with `--unix-socket`).
//! `server` routes requests to the engine task as `Command`s; `client` is what the CLI uses.

pub mod client;
pub mod server;
pub mod types;

use palisade_policies::labels::Labels;
use tokio::sync::oneshot;

use crate::engine::EngineError;
use types::{
    ConntrackView, EndpointAddRequest, EndpointView, IdentityView, LabelChange, PolicyApplyResult,
    PolicyDeleteResult, PolicyView, StatusView, TraceRequest, TraceResult,
};

pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// Requests the engine task serves, one at a time.
pub enum Command {
    EndpointAdd(EndpointAddRequest, Reply<EndpointView>),
    EndpointLabel(String, LabelChange, Reply<EndpointView>),
    EndpointDelete(String, Reply<()>),
    EndpointList(Reply<Vec<EndpointView>>),
    NamespaceLabel(String, LabelChange, Reply<Labels>),
    IdentityList(Reply<Vec<IdentityView>>),
    PolicyApply(String, Reply<PolicyApplyResult>),
    PolicyDelete(Option<String>, String, Reply<PolicyDeleteResult>),
    PolicyList(Reply<Vec<PolicyView>>),
    Trace(TraceRequest, Reply<TraceResult>),
    Status(Reply<StatusView>),
    Conntrack(Reply<Vec<ConntrackView>>),
}
