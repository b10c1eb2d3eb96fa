//! Structured flow filters, as `palisade observe` builds them from its flags: criteria with a
//! field, values (arbitrary strings, or values shaped like the field's syntax so matching gets
//! exercised too) and a negation. `prepare` and `matches` must never panic; a filter that
//! fails `prepare` fails with an error naming the field and value (see `check_filter`).
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade_api::filter::{Criterion, Field, FlowFilter};
use palisade_api_fuzz::check_filter;

/// Every field; a byte picks one.
const FIELDS: [Field; 23] = [
    Field::FromPod,
    Field::ToPod,
    Field::Pod,
    Field::FromLabel,
    Field::ToLabel,
    Field::Label,
    Field::FromIdentity,
    Field::ToIdentity,
    Field::Identity,
    Field::FromIp,
    Field::ToIp,
    Field::Ip,
    Field::FromPort,
    Field::ToPort,
    Field::Port,
    Field::Protocol,
    Field::Verdict,
    Field::Namespace,
    Field::DropReason,
    Field::HttpMethod,
    Field::HttpStatus,
    Field::HttpPath,
    Field::Fqdn,
];

/// Fails to build when `Field` gains a variant: add it to `FIELDS` too.
const _: fn(Field) = |field| match field {
    Field::FromPod
    | Field::ToPod
    | Field::Pod
    | Field::FromLabel
    | Field::ToLabel
    | Field::Label
    | Field::FromIdentity
    | Field::ToIdentity
    | Field::Identity
    | Field::FromIp
    | Field::ToIp
    | Field::Ip
    | Field::FromPort
    | Field::ToPort
    | Field::Port
    | Field::Protocol
    | Field::Verdict
    | Field::Namespace
    | Field::DropReason
    | Field::HttpMethod
    | Field::HttpStatus
    | Field::HttpPath
    | Field::Fqdn => {}
};

/// Words the fixed flows and the fields' syntax use.
const WORDS: [&str; 24] = [
    "shop/frontend",
    "shop/db",
    "shop/backend",
    "app=frontend",
    "k8s:app=db",
    "tier",
    "reserved:world",
    "tcp",
    "UDP",
    "icmp",
    "http",
    "DROPPED",
    "forwarded",
    "AUDIT",
    "Policy denied by denylist",
    "181",
    "GET",
    "4xx",
    "4+",
    "403",
    "/api/.*",
    "/api/products/[0-9]+",
    "(?i)/API/.*",
    "shop",
];

/// Pieces of regular expressions, for `http-path` values: groups, classes, repetition, flags,
/// escapes, comments.
const REGEX_PIECES: [&str; 26] = [
    "/api", "/", ".*", ".", "[0-9]+", "[^/]", "(", ")", "(?:", "(?i)", "(?x)", "(?s)", "(?-u)",
    "|", "*", "+", "?", "{2,3}", "\\d", "\\/", "\\", "#", " ", "\n", "^", "$",
];

#[derive(Debug, Arbitrary)]
enum Value {
    Raw(String),
    Regex(Vec<u8>),
    Word(u8),
    Number(u32),
    Port(u16),
    Ip([u8; 4]),
    Pod(String, String),
    Status(u16, bool),
}

impl Value {
    fn render(self) -> String {
        match self {
            Value::Raw(s) => s,
            Value::Regex(pieces) => pieces
                .into_iter()
                .map(|i| REGEX_PIECES[usize::from(i) % REGEX_PIECES.len()])
                .collect(),
            Value::Word(i) => WORDS[usize::from(i) % WORDS.len()].to_string(),
            Value::Number(n) => n.to_string(),
            Value::Port(p) => p.to_string(),
            Value::Ip(a) => std::net::Ipv4Addr::from(a).to_string(),
            Value::Pod(ns, name) => format!("{ns}/{name}"),
            Value::Status(s, true) => format!("{}xx", s % 10),
            Value::Status(s, false) => format!("{}+", s % 10),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct RawCriterion {
    field: u8,
    values: Vec<Value>,
    negate: bool,
}

fuzz_target!(|criteria: Vec<RawCriterion>| {
    let filter = FlowFilter {
        criteria: criteria
            .into_iter()
            .map(|c| Criterion {
                field: FIELDS[usize::from(c.field) % FIELDS.len()],
                values: c.values.into_iter().map(Value::render).collect(),
                negate: c.negate,
            })
            .collect(),
    };
    check_filter(&filter);
});
