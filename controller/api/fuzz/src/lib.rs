//! What both targets check about a flow filter: `prepare` either fails with an error naming
//! the criterion's field and value, or gives a filter that agrees with the unprepared one on a
//! few fixed flows (a TCP drop, a denied L7 request, a UDP flow to the world, an audited ICMP
//! echo from the host). Filters asking for more regular-expression work than `within_budget`
//! allows are skipped.

use std::sync::LazyLock;

use palisade_api::filter::{Criterion, Field, FlowFilter};
use palisade_api::flow::Flow;
use serde_json::json;

/// The fixed flows, in their JSON form (docs/flows.md), so fields added later with a default
/// need no change here.
pub static FLOWS: LazyLock<Vec<Flow>> = LazyLock::new(|| {
    let frontend = json!({"identity": 256, "namespace": "shop", "name": "frontend",
        "labels": ["k8s:app=frontend", "k8s:tier=web"]});
    let backend = json!({"identity": 257, "namespace": "shop", "name": "backend",
        "labels": ["k8s:app=backend", "k8s:tier=api"]});
    let db = json!({"identity": 258, "namespace": "shop", "name": "db",
        "labels": ["k8s:app=db", "k8s:tier=data"]});
    let flows = [
        json!({
            "seq": 1, "time": "2026-11-28T16:00:00.000000Z", "verdict": "DROPPED",
            "drop_reason": "Policy denied by denylist", "drop_reason_code": 181,
            "event": "drop", "direction": "ingress",
            "endpoint": db, "source": frontend, "destination": db,
            "ip": {"source": "10.200.0.2", "destination": "10.200.0.4"},
            "l4": {"protocol": "TCP", "source_port": 49478, "destination_port": 5432,
                "tcp_flags": ["SYN"]},
            "policy": {"name": "shop/db-guard", "kind": "palisade",
                "rule": "shop/db-guard ingress deny rule 0"},
            "packet_bytes": 60,
        }),
        json!({
            "seq": 2, "time": "2026-11-28T16:00:01.000000Z", "verdict": "DROPPED",
            "drop_reason": "Policy denied (L7)", "drop_reason_code": 133,
            "event": "http-request", "direction": "ingress",
            "endpoint": backend, "source": frontend, "destination": backend,
            "ip": {"source": "10.200.0.2", "destination": "10.200.0.5"},
            "l4": {"protocol": "TCP", "source_port": 41234, "destination_port": 8080},
            "packet_bytes": 0,
            "http": {"method": "DELETE", "path": "/api/products/42", "host": "backend:8080",
                "status": 403, "latency_us": 120},
        }),
        json!({
            "seq": 3, "time": "2026-11-28T16:00:02.000000Z", "verdict": "FORWARDED",
            "event": "new-connection", "direction": "egress",
            "endpoint": frontend, "source": frontend,
            "destination": {"identity": 2, "labels": ["reserved:world"]},
            "ip": {"source": "10.200.0.2", "destination": "8.8.8.8"},
            "l4": {"protocol": "UDP", "source_port": 53000, "destination_port": 53},
            "packet_bytes": 72,
        }),
        json!({
            "seq": 4, "time": "2026-11-28T16:00:03.000000Z", "verdict": "AUDIT",
            "event": "new-connection", "direction": "ingress",
            "endpoint": db, "source": {"identity": 1, "labels": ["reserved:host"]},
            "destination": db,
            "ip": {"source": "10.0.0.254", "destination": "10.200.0.4"},
            "l4": {"protocol": "ICMP", "source_port": 0, "destination_port": 0},
            "packet_bytes": 84,
        }),
    ];
    flows
        .into_iter()
        .map(|f| serde_json::from_value(f).expect("a valid flow record"))
        .collect()
});

/// The serde name of a field (`http-path`), as the API and `-o json` spell it.
fn wire_name(field: Field) -> String {
    serde_json::to_value(field)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The `http-path` work an input may ask for: this many expressions, each compiling to at most
/// this many bytes. Instrumented, compiling one large expression takes seconds, which would
/// read as a hang of the filter code; what large and many expressions cost the agent is
/// measured outside the fuzzer.
const MAX_PATH_VALUES: usize = 16;
const PATH_REGEX_BUDGET: usize = 1 << 16;

fn within_budget(filter: &FlowFilter) -> bool {
    let paths: Vec<&String> = filter
        .criteria
        .iter()
        .filter(|c| c.field == Field::HttpPath)
        .flat_map(|c| &c.values)
        .collect();
    paths.len() <= MAX_PATH_VALUES
        && paths.iter().all(|v| {
            !matches!(
                regex::RegexBuilder::new(&format!("^(?:{v})$"))
                    .size_limit(PATH_REGEX_BUDGET)
                    .build(),
                Err(regex::Error::CompiledTooBig(_))
            )
        })
}

pub fn check_filter(filter: &FlowFilter) {
    if !within_budget(filter) {
        return;
    }
    match filter.clone().prepare() {
        Ok(prepared) => {
            // The unprepared filter compiles its `http-path` expressions on every call, and
            // they only matter for flows with an HTTP request: with any, the two are compared
            // on those flows only (regular expressions are what makes this target slow).
            let has_paths = filter.criteria.iter().any(|c| c.field == Field::HttpPath);
            for flow in FLOWS.iter() {
                let matched = prepared.matches(flow);
                if !has_paths || flow.http.is_some() {
                    assert_eq!(
                        matched,
                        filter.matches(flow),
                        "prepared and unprepared filters disagree on {flow:?}"
                    );
                }
            }
            for criterion in &filter.criteria {
                check_valid_criterion(criterion);
            }
        }
        Err(e) => {
            let Some((criterion, first)) = filter
                .criteria
                .iter()
                .find_map(|c| c.validate().err().map(|e| (c, e)))
            else {
                panic!("prepare rejected a filter that validates: {e}");
            };
            assert_eq!(e, first, "prepare fails on the first invalid criterion");
            assert!(
                criterion.values.contains(&e.value),
                "{e:?} names a value {criterion:?} does not have"
            );
            assert!(
                e.field == format!("{:?}", criterion.field)
                    || e.field == wire_name(criterion.field),
                "{e:?} does not name the field of {criterion:?}"
            );
            let line = e.to_string();
            assert!(line.contains(&e.field), "{line:?}");
        }
    }
}

/// A criterion that validates: negating it inverts it on every flow, and an `http-path`
/// value is a regular expression in the form the matcher compiles it (anchored), so a
/// validated filter never silently matches nothing ("a typo is an error, not an empty
/// result", as `Criterion::validate` promises).
fn check_valid_criterion(criterion: &Criterion) {
    let negated = Criterion {
        negate: !criterion.negate,
        ..criterion.clone()
    };
    let paths = criterion.field == Field::HttpPath;
    for flow in FLOWS.iter().filter(|f| !paths || f.http.is_some()) {
        assert_ne!(criterion.matches(flow), negated.matches(flow), "{flow:?}");
    }
    if paths {
        for v in &criterion.values {
            assert!(
                regex::Regex::new(&format!("^(?:{v})$")).is_ok(),
                "http-path value {v:?} validates but does not compile anchored"
            );
        }
    }
}
