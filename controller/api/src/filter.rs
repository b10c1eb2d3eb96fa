//! Flow filters, as `hubble observe` takes them: each criterion names a field and one or more
//! values (any may match); all criteria must hold; a criterion may be negated (`--not`).

use serde::{Deserialize, Serialize};

use crate::flow::{Flow, FlowPeer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Field {
    /// The source endpoint, as hubble's `--from-pod`: `[NAMESPACE/]NAME-PREFIX` (see
    /// [`pod_matches`]).
    FromPod,
    ToPod,
    /// Either side.
    Pod,
    /// Identity label `key=value` or `key` on the source.
    FromLabel,
    ToLabel,
    Label,
    FromIdentity,
    ToIdentity,
    Identity,
    FromIp,
    ToIp,
    Ip,
    FromPort,
    ToPort,
    Port,
    /// tcp, udp, icmp, sctp.
    Protocol,
    /// FORWARDED, DROPPED, AUDIT, REDIRECTED.
    Verdict,
    /// Either side's namespace.
    Namespace,
    /// Drop reason words or code.
    DropReason,
    /// HTTP method (L7 flows).
    HttpMethod,
    /// HTTP status: exact (`403`) or class (`4xx`, `4+`).
    HttpStatus,
    /// Regular expression over the normalized HTTP path (anchored).
    HttpPath,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Criterion {
    pub field: Field,
    pub values: Vec<String>,
    #[serde(default)]
    pub negate: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    pub criteria: Vec<Criterion>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} filter value {value:?}: {why}")]
pub struct FilterError {
    pub field: String,
    pub value: String,
    pub why: &'static str,
}

/// `403`, or a class: `4xx` / `4+`.
fn status_matches(status: u16, want: &str) -> bool {
    match want.strip_suffix("xx").or_else(|| want.strip_suffix('+')) {
        Some(class) => class.parse::<u16>().is_ok_and(|c| status / 100 == c),
        None => want.parse::<u16>().is_ok_and(|s| s == status),
    }
}

/// The namespace pod filters mean when they name none, as in hubble.
pub const DEFAULT_POD_NAMESPACE: &str = "default";

/// A pod filter value, `[NAMESPACE/]NAME-PREFIX`, as (namespace, prefix); None when malformed
/// (empty, an empty namespace, or a second `/`).
fn pod_filter(v: &str) -> Option<(&str, &str)> {
    match v.split_once('/') {
        Some((namespace, prefix)) => {
            (!namespace.is_empty() && !prefix.contains('/')).then_some((namespace, prefix))
        }
        None => (!v.is_empty()).then_some((DEFAULT_POD_NAMESPACE, v)),
    }
}

/// Hubble's pod filter: the peer is an endpoint in the namespace (`default` when the value
/// names none) whose name starts with the prefix, so `shop/web-` matches every pod of a
/// Deployment `web` and `shop/` every pod of the namespace. Peers that are no endpoint
/// (world, host) never match.
pub fn pod_matches(peer: &FlowPeer, want: &str) -> bool {
    pod_filter(want).is_some_and(|(namespace, prefix)| {
        !peer.name.is_empty() && peer.namespace == namespace && peer.name.starts_with(prefix)
    })
}

fn label_matches(p: &FlowPeer, want: &str) -> bool {
    let want = want.strip_prefix("k8s:").unwrap_or(want);
    p.labels.iter().any(|l| {
        let l = l.split_once(':').map_or(l.as_str(), |(_, rest)| rest);
        match want.split_once('=') {
            Some(_) => l == want,
            None => l.split_once('=').map_or(l, |(k, _)| k) == want,
        }
    })
}

impl Criterion {
    /// `path_re` is the compiled `--http-path` value (for `Field::HttpPath` only).
    fn value_matches(&self, flow: &Flow, v: &str, path_re: Option<&regex::Regex>) -> bool {
        let src_port = flow.l4.source_port.to_string();
        let dst_port = flow.l4.destination_port.to_string();
        match self.field {
            Field::FromPod => pod_matches(&flow.source, v),
            Field::ToPod => pod_matches(&flow.destination, v),
            Field::Pod => pod_matches(&flow.source, v) || pod_matches(&flow.destination, v),
            Field::FromLabel => label_matches(&flow.source, v),
            Field::ToLabel => label_matches(&flow.destination, v),
            Field::Label => label_matches(&flow.source, v) || label_matches(&flow.destination, v),
            Field::FromIdentity => flow.source.identity.to_string() == v,
            Field::ToIdentity => flow.destination.identity.to_string() == v,
            Field::Identity => {
                flow.source.identity.to_string() == v || flow.destination.identity.to_string() == v
            }
            Field::FromIp => flow.ip.source.to_string() == v,
            Field::ToIp => flow.ip.destination.to_string() == v,
            Field::Ip => flow.ip.source.to_string() == v || flow.ip.destination.to_string() == v,
            Field::FromPort => src_port == v,
            Field::ToPort => dst_port == v,
            Field::Port => src_port == v || dst_port == v,
            Field::Protocol if v.eq_ignore_ascii_case("http") => flow.http.is_some(),
            Field::Protocol => flow.l4.protocol.eq_ignore_ascii_case(v),
            Field::HttpMethod => flow
                .http
                .as_ref()
                .is_some_and(|h| h.method.eq_ignore_ascii_case(v)),
            Field::HttpStatus => flow
                .http
                .as_ref()
                .is_some_and(|h| status_matches(h.status, v)),
            Field::HttpPath => flow
                .http
                .as_ref()
                .is_some_and(|h| path_re.is_some_and(|r| r.is_match(&h.path))),
            Field::Verdict => flow.verdict.eq_ignore_ascii_case(v),
            Field::Namespace => flow.source.namespace == v || flow.destination.namespace == v,
            Field::DropReason => {
                flow.drop_reason
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(v))
                    || flow.drop_reason_code.is_some_and(|c| c.to_string() == v)
            }
        }
    }

    /// Anchored regular expressions for `--http-path` values (none for other fields).
    fn compile_paths(&self) -> Vec<Option<regex::Regex>> {
        self.values
            .iter()
            .map(|v| {
                (self.field == Field::HttpPath)
                    .then(|| palisade_policies::l7::anchored_regex(v).ok())
                    .flatten()
            })
            .collect()
    }

    fn matches_compiled(&self, flow: &Flow, paths: &[Option<regex::Regex>]) -> bool {
        self.values
            .iter()
            .enumerate()
            .any(|(i, v)| self.value_matches(flow, v, paths.get(i).and_then(Option::as_ref)))
            != self.negate
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        self.matches_compiled(flow, &self.compile_paths())
    }

    /// Checks values that have a fixed syntax, so a typo is an error, not an empty result.
    pub fn validate(&self) -> Result<(), FilterError> {
        for v in &self.values {
            let bad = |why| FilterError {
                field: format!("{:?}", self.field),
                value: v.clone(),
                why,
            };
            match self.field {
                Field::FromPod | Field::ToPod | Field::Pod if pod_filter(v).is_none() => {
                    return Err(bad(
                        "expected [NAMESPACE/]POD: a namespace (default: default) and a pod name prefix",
                    ));
                }
                Field::FromIdentity | Field::ToIdentity | Field::Identity
                    if v.parse::<u32>().is_err() =>
                {
                    return Err(bad("expected a numeric identity"));
                }
                Field::FromIp | Field::ToIp | Field::Ip
                    if v.parse::<std::net::Ipv4Addr>().is_err() =>
                {
                    return Err(bad("expected an IPv4 address"));
                }
                Field::FromPort | Field::ToPort | Field::Port if v.parse::<u16>().is_err() => {
                    return Err(bad("expected a port number"));
                }
                Field::Protocol
                    if !["tcp", "udp", "icmp", "sctp", "http"]
                        .contains(&v.to_ascii_lowercase().as_str()) =>
                {
                    return Err(bad("expected tcp, udp, icmp, sctp or http"));
                }
                Field::Verdict
                    if !["FORWARDED", "DROPPED", "AUDIT", "REDIRECTED"]
                        .contains(&v.to_ascii_uppercase().as_str()) =>
                {
                    return Err(bad("expected FORWARDED, DROPPED, AUDIT or REDIRECTED"));
                }
                Field::HttpStatus
                    if !(v.parse::<u16>().is_ok()
                        || v.strip_suffix("xx")
                            .or_else(|| v.strip_suffix('+'))
                            .is_some_and(|c| c.parse::<u16>().is_ok())) =>
                {
                    return Err(bad("expected a status (403) or a class (4xx)"));
                }
                // The anchored form, as matching compiles it: `(?x)/a #` is a valid expression
                // whose comment swallows the anchor, and would then silently match nothing.
                Field::HttpPath => {
                    if let Err(e) = palisade_policies::l7::anchored_regex(v) {
                        return Err(bad(match e {
                            regex::Error::CompiledTooBig(_) => {
                                "a regular expression too large to match with"
                            }
                            _ => "expected a regular expression",
                        }));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl FlowFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        self.criteria.iter().all(|c| c.matches(flow))
    }

    pub fn validate(&self) -> Result<(), FilterError> {
        self.criteria.iter().try_for_each(Criterion::validate)
    }

    /// Validates and compiles once, for matching many flows (a `--follow` stream).
    pub fn prepare(self) -> Result<PreparedFilter, FilterError> {
        self.validate()?;
        let paths = self.criteria.iter().map(Criterion::compile_paths).collect();
        Ok(PreparedFilter {
            filter: self,
            paths,
        })
    }
}

/// A validated filter with its regular expressions compiled.
#[derive(Debug)]
pub struct PreparedFilter {
    filter: FlowFilter,
    paths: Vec<Vec<Option<regex::Regex>>>,
}

impl PreparedFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        self.filter
            .criteria
            .iter()
            .zip(&self.paths)
            .all(|(c, paths)| c.matches_compiled(flow, paths))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{FlowIp, FlowL4};
    use std::net::Ipv4Addr;

    fn flow(verdict: &str, src: (&str, &str), dst: (&str, &str), dport: u16) -> Flow {
        let peer = |(ns, name): (&str, &str), id: u32, app: &str| FlowPeer {
            identity: id,
            namespace: ns.into(),
            name: name.into(),
            labels: vec![format!("k8s:app={app}")],
        };
        Flow {
            seq: 1,
            time: "2026-11-28T16:00:00.000000Z".into(),
            verdict: verdict.into(),
            drop_reason: (verdict == "DROPPED").then(|| "Policy denied".into()),
            drop_reason_code: (verdict == "DROPPED").then_some(133),
            event: "drop".into(),
            direction: "ingress".into(),
            endpoint: FlowPeer::default(),
            source: peer(src, 256, src.1),
            destination: peer(dst, 257, dst.1),
            ip: FlowIp {
                source: Ipv4Addr::new(10, 200, 0, 2),
                destination: Ipv4Addr::new(10, 200, 0, 3),
            },
            l4: FlowL4 {
                protocol: "TCP".into(),
                source_port: 40000,
                destination_port: dport,
                tcp_flags: vec![],
            },
            policy: None,
            packet_bytes: 60,
            http: None,
            tunnel: None,
        }
    }

    fn crit(field: Field, values: &[&str], negate: bool) -> Criterion {
        Criterion {
            field,
            values: values
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            negate,
        }
    }

    #[test]
    fn criteria_are_anded_and_values_ored() {
        let f = flow("DROPPED", ("demo", "frontend"), ("demo", "db"), 5432);
        let filter = FlowFilter {
            criteria: vec![
                crit(Field::Verdict, &["dropped"], false),
                crit(Field::ToPod, &["demo/backend", "demo/db"], false),
            ],
        };
        assert!(filter.matches(&f));
        let filter = FlowFilter {
            criteria: vec![
                crit(Field::Verdict, &["FORWARDED"], false),
                crit(Field::ToPod, &["demo/db"], false),
            ],
        };
        assert!(!filter.matches(&f));
    }

    #[test]
    fn negation_inverts_one_criterion() {
        let f = flow("FORWARDED", ("demo", "frontend"), ("demo", "backend"), 8080);
        assert!(crit(Field::Pod, &["demo/db"], true).matches(&f));
        assert!(!crit(Field::Pod, &["demo/backend"], true).matches(&f));
    }

    #[test]
    fn labels_match_with_or_without_source_prefix_and_by_key() {
        let f = flow("FORWARDED", ("demo", "frontend"), ("demo", "backend"), 8080);
        assert!(crit(Field::FromLabel, &["app=frontend"], false).matches(&f));
        assert!(crit(Field::FromLabel, &["k8s:app=frontend"], false).matches(&f));
        assert!(crit(Field::ToLabel, &["app"], false).matches(&f));
        assert!(!crit(Field::ToLabel, &["app=frontend"], false).matches(&f));
    }

    #[test]
    fn ports_protocols_and_identities_match() {
        let f = flow("DROPPED", ("demo", "frontend"), ("demo", "db"), 5432);
        assert!(crit(Field::Port, &["5432"], false).matches(&f));
        assert!(crit(Field::FromPort, &["40000"], false).matches(&f));
        assert!(!crit(Field::ToPort, &["40000"], false).matches(&f));
        assert!(crit(Field::Protocol, &["tcp"], false).matches(&f));
        assert!(crit(Field::ToIdentity, &["257"], false).matches(&f));
        assert!(crit(Field::Ip, &["10.200.0.3"], false).matches(&f));
        assert!(crit(Field::DropReason, &["policy denied"], false).matches(&f));
        assert!(crit(Field::Namespace, &["demo"], false).matches(&f));
    }

    #[test]
    fn http_filters_match_l7_flows_only() {
        let mut f = flow("DROPPED", ("demo", "frontend"), ("demo", "backend"), 8080);
        assert!(!crit(Field::Protocol, &["http"], false).matches(&f));
        f.http = Some(crate::flow::FlowHttp {
            method: "POST".into(),
            path: "/admin/users".into(),
            host: Some("backend".into()),
            status: 403,
            latency_us: 120,
        });
        assert!(crit(Field::Protocol, &["http"], false).matches(&f));
        assert!(crit(Field::HttpMethod, &["post"], false).matches(&f));
        assert!(crit(Field::HttpStatus, &["403"], false).matches(&f));
        assert!(crit(Field::HttpStatus, &["4xx"], false).matches(&f));
        assert!(crit(Field::HttpStatus, &["4+"], false).matches(&f));
        assert!(!crit(Field::HttpStatus, &["2xx"], false).matches(&f));
        assert!(crit(Field::HttpPath, &["/admin/.*"], false).matches(&f));
        assert!(
            !crit(Field::HttpPath, &["/admin"], false).matches(&f),
            "anchored"
        );
        let prepared = FlowFilter {
            criteria: vec![
                crit(Field::HttpPath, &["/admin/.*"], false),
                crit(Field::HttpMethod, &["POST"], false),
            ],
        }
        .prepare()
        .unwrap();
        assert!(prepared.matches(&f));
        assert!(
            FlowFilter {
                criteria: vec![crit(Field::HttpPath, &["(x"], false)]
            }
            .prepare()
            .is_err()
        );
        assert!(crit(Field::HttpStatus, &["abc"], false).validate().is_err());
        assert!(crit(Field::HttpPath, &["(x"], false).validate().is_err());
    }

    #[test]
    fn pod_filters_match_a_name_prefix_in_a_namespace_as_hubble_does() {
        let f = flow(
            "FORWARDED",
            ("shop", "web-5d8f7c-x2x4z"),
            ("default", "db-0"),
            5432,
        );
        for (field, value, expected) in [
            (Field::FromPod, "shop/web-5d8f7c-x2x4z", true),
            (Field::FromPod, "shop/web-", true),
            (Field::FromPod, "shop/", true),
            (Field::FromPod, "shop/db", false),
            (Field::FromPod, "other/web-", false),
            (Field::FromPod, "web-", false),
            (Field::ToPod, "db-0", true),
            (Field::ToPod, "default/db", true),
            (Field::ToPod, "shop/db", false),
            (Field::Pod, "shop/web", true),
            (Field::Pod, "db", true),
            (Field::Pod, "shop/db", false),
        ] {
            let c = crit(field, &[value], false);
            assert!(c.validate().is_ok(), "{value}");
            assert_eq!(c.matches(&f), expected, "{field:?} {value}");
        }
        let mut world = f.clone();
        world.source.name = String::new();
        assert!(!crit(Field::FromPod, &["shop/"], false).matches(&world));
    }

    #[test]
    fn malformed_values_are_rejected() {
        for pod in ["", "/db", "a/b/c"] {
            let err = crit(Field::Pod, &[pod], false).validate().unwrap_err();
            assert!(err.to_string().contains("[NAMESPACE/]POD"), "{err}");
        }
        assert!(crit(Field::Port, &["http"], false).validate().is_err());
        assert!(
            crit(Field::Verdict, &["ALLOWED"], false)
                .validate()
                .is_err()
        );
        assert!(crit(Field::Ip, &["10.0.0"], false).validate().is_err());
        assert!(crit(Field::Protocol, &["tcp"], false).validate().is_ok());
    }

    #[test]
    fn a_path_that_only_compiles_unanchored_is_an_error_not_a_filter_that_matches_nothing() {
        // Found by the flow_filter fuzz target: the comment swallows the anchor `)$`.
        let err = crit(Field::HttpPath, &["(?x)/admin #"], false)
            .validate()
            .unwrap_err();
        assert_eq!(err.value, "(?x)/admin #");
        assert!(
            crit(Field::HttpPath, &["(?x)/admin"], false)
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn a_path_too_large_to_compile_is_refused_at_once() {
        // Found by fuzzing: without a size bound each such value cost ~28 ms to compile.
        let huge = "[^/]{2,3}{2,3}{2,3}{2,3}{2,3}{2,3}{2,3}{2,3}";
        let err = crit(Field::HttpPath, &[huge; 100], false)
            .validate()
            .unwrap_err();
        assert!(err.why.contains("too large"), "{}", err.why);
    }
}
