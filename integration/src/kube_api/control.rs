//! Test controls that act per request: injected failures and request counts.

use std::collections::BTreeMap;
use std::time::Duration;

use super::server::RequestInfo;
use super::status::{ApiError, GroupResource};

/// A request's verb (RBAC's names: get, list, watch, create, update, patch, delete,
/// deletecollection), group, resource and subresource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
}

impl RequestKey {
    pub(crate) fn of(info: &RequestInfo) -> RequestKey {
        RequestKey {
            verb: info.verb.to_string(),
            group: info.group.clone(),
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
        }
    }
}

/// How many requests the server answered (or refused), by verb and resource, plus the
/// non-resource paths (discovery, `/version`) by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub resources: BTreeMap<RequestKey, u64>,
    pub paths: BTreeMap<String, u64>,
}

impl RequestCounts {
    /// Requests of `verb` on `resource` (any group, subresources included).
    pub fn of(&self, verb: &str, resource: &str) -> u64 {
        self.resources
            .iter()
            .filter(|(k, _)| k.verb == verb && k.resource == resource)
            .map(|(_, n)| n)
            .sum()
    }

    /// Every resource request.
    pub fn total(&self) -> u64 {
        self.resources.values().sum()
    }

    /// Resource requests of one verb.
    pub fn verb(&self, verb: &str) -> u64 {
        self.resources
            .iter()
            .filter(|(k, _)| k.verb == verb)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests to non-resource paths (discovery and the like).
    pub fn discovery(&self) -> u64 {
        self.paths.values().sum()
    }
}

/// What an injected fault answers.
#[derive(Clone, Debug)]
enum Answer {
    /// RBAC's denial for whoever asks, worded for the request's verb, resource, namespace and
    /// name.
    Forbidden {
        user: String,
    },
    Status(ApiError),
    /// Served normally, after this long (a slow or overloaded server).
    Delay(Duration),
    /// The connection is closed mid-response, as a network failure would close it.
    Drop,
}

/// What the server does with a request a fault matched.
#[derive(Clone, Debug)]
pub(crate) enum Injected {
    Fail(ApiError),
    Delay(Duration),
    Drop,
}

/// A failure to inject: requests that match answer with it instead of being served.
#[derive(Clone, Debug)]
pub struct Fault {
    verb: Option<String>,
    group: Option<String>,
    resource: Option<String>,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    remaining: Option<u32>,
    answer: Answer,
}

impl Fault {
    fn new(verb: &str, group: &str, resource: &str, answer: Answer) -> Fault {
        let any = |s: &str| (s != "*").then(|| s.to_string());
        Fault {
            verb: any(verb),
            group: any(group),
            resource: any(resource),
            subresource: None,
            namespace: None,
            name: None,
            remaining: None,
            answer,
        }
    }

    /// The real RBAC denial (`403 Forbidden`, reason `Forbidden`) of `verb` on
    /// `group`/`resource` for `user`, e.g.
    /// `Fault::forbidden("system:serviceaccount:palisade:palisade", "list", "", "pods")`.
    /// `"*"` matches any verb, group or resource.
    pub fn forbidden(user: &str, verb: &str, group: &str, resource: &str) -> Fault {
        Fault::new(
            verb,
            group,
            resource,
            Answer::Forbidden {
                user: user.to_string(),
            },
        )
    }

    /// Any `Status` error, e.g. `ApiError::new(429, "TooManyRequests", "...")` or
    /// `ApiError::internal("etcdserver: request timed out")`.
    pub fn status(verb: &str, group: &str, resource: &str, error: ApiError) -> Fault {
        Fault::new(verb, group, resource, Answer::Status(error))
    }

    /// Matching requests are served, but only after `delay`.
    pub fn delay(verb: &str, group: &str, resource: &str, delay: Duration) -> Fault {
        Fault::new(verb, group, resource, Answer::Delay(delay))
    }

    /// Matching requests get the response headers and then a closed connection, as when the
    /// network fails mid-response.
    pub fn drop_connection(verb: &str, group: &str, resource: &str) -> Fault {
        Fault::new(verb, group, resource, Answer::Drop)
    }

    /// Only requests to this subresource (`"status"`); by default only the main resource.
    pub fn subresource(mut self, sub: &str) -> Fault {
        self.subresource = Some(sub.to_string());
        self
    }

    pub fn in_namespace(mut self, ns: &str) -> Fault {
        self.namespace = Some(ns.to_string());
        self
    }

    pub fn named(mut self, name: &str) -> Fault {
        self.name = Some(name.to_string());
        self
    }

    /// Answer only the next `n` matching requests, then serve them again.
    pub fn times(mut self, n: u32) -> Fault {
        self.remaining = Some(n);
        self
    }

    fn matches(&self, info: &RequestInfo) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        eq(&self.verb, info.verb)
            && eq(&self.group, &info.group)
            && eq(&self.resource, &info.resource)
            && self.subresource.as_deref().unwrap_or("") == info.subresource
            && eq(&self.namespace, &info.namespace)
            && eq(&self.name, &info.name)
            && self.remaining != Some(0)
    }

    fn answer(&self, info: &RequestInfo) -> Injected {
        match &self.answer {
            Answer::Status(e) => Injected::Fail(e.clone()),
            Answer::Delay(d) => Injected::Delay(*d),
            Answer::Drop => Injected::Drop,
            Answer::Forbidden { user } => Injected::Fail(ApiError::forbidden(
                user,
                info.verb,
                &GroupResource::new(&info.group, &info.resource),
                &info.subresource,
                &info.namespace,
                &info.name,
            )),
        }
    }
}

/// Identifies an injected fault, to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultId(u64);

#[derive(Default)]
pub struct Controls {
    faults: Vec<(FaultId, Fault)>,
    next_fault: u64,
    counts: RequestCounts,
}

impl Controls {
    pub fn inject(&mut self, fault: Fault) -> FaultId {
        self.next_fault += 1;
        let id = FaultId(self.next_fault);
        self.faults.push((id, fault));
        id
    }

    pub fn remove(&mut self, id: FaultId) {
        self.faults.retain(|(i, _)| *i != id);
    }

    pub fn clear(&mut self) {
        self.faults.clear();
    }

    pub(crate) fn fault_for(&mut self, info: &RequestInfo) -> Option<Injected> {
        let (_, f) = self.faults.iter_mut().find(|(_, f)| f.matches(info))?;
        if let Some(n) = &mut f.remaining {
            *n -= 1;
        }
        Some(f.answer(info))
    }

    pub fn count(&mut self, key: RequestKey) {
        *self.counts.resources.entry(key).or_default() += 1;
    }

    pub fn count_path(&mut self, path: &str) {
        *self.counts.paths.entry(path.to_string()).or_default() += 1;
    }

    pub fn counts(&self) -> RequestCounts {
        self.counts.clone()
    }

    pub fn reset_counts(&mut self) {
        self.counts = RequestCounts::default();
    }
}
