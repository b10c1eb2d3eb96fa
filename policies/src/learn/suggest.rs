//! `palisade policy suggest`: least-privilege policies from the connection log.
//!
//! One policy per workload group that judged observed traffic (forwarded, redirected to the
//! proxy, or audited: what happened, or would have but for audit; drops are not learned). It
//! selects the group by its stable labels and puts it in default deny both ways; each rule
//! allows one observed peer on the ports and protocols seen with it:
//!
//! - a workload peer by label selector (in another namespace with a namespace selector on
//!   `kubernetes.io/metadata.name`), never by pod name or address;
//! - an address outside the cluster by CIDR: its /32, or the /24 when `WORLD_COLLAPSE` or
//!   more addresses of one /24 were seen;
//! - the node by the `host` entity, other reserved identities by theirs (palisade format);
//! - HTTP requests seen through the L7 proxy as `rules.http`, method and path, paths with
//!   more than `PATH_FANOUT` different next segments collapsed into `prefix/.*`;
//! - DNS, from the lookups the DNS proxy answered the group (palisade format):
//!   - an address outside the cluster that an answer to one of the group's own lookups held
//!     is allowed by name, `toFQDNs: [{matchName: NAME}]` (every name whose answers held it),
//!     on the ports seen, instead of by CIDR; addresses no answer held stay CIDR rules;
//!   - the DNS server's rule carries the lookups: `toPorts: [{ports: [{port: "53", protocol:
//!     ANY}], rules: {dns: [...]}}]` listing exactly the names looked up there, sorted, except
//!     that more than `DNS_FANOUT` names one label below the same parent (`a.cdn.example.com`,
//!     `b.cdn.example.com`, ...) become `matchPattern: "*.parent"` (never for a parent that
//!     is a top-level domain, so never `*.com`). `*` matches one label, so the pattern allows
//!     exactly the names one label below the parent; `toFQDNs` keeps the exact names.
//!
//!   The Kubernetes format has neither: there the addresses stay CIDR rules and the DNS port is
//!   allowed whole, as comments say.
//!
//! Selectors: the group's well-known application labels (`app.kubernetes.io/name`, `app`,
//! `tier`, ...) when they tell it apart from every other group seen in its namespace; else its
//! stable labels without version labels; else all its stable labels.
//!
//! The output is deterministic (the same records give the same bytes): documents sorted by
//! namespace and selector, rules by peer, ports by protocol and number; a comment above each
//! rule names the flows behind it. It is valid input for `policy apply` as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::time::rfc3339;
use super::{ConnectionRecord, FlowVerdict, Group, HttpRecord, LogSnapshot};
use crate::labels::{Labels, NAMESPACE_NAME_LABEL};
use crate::model::Direction;

/// Labels that name an application, its part or its role, in the order they are preferred.
pub const WELL_KNOWN_LABELS: [&str; 10] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app",
    "k8s-app",
    "component",
    "tier",
    "role",
    "name",
];
/// Labels that change from release to release.
pub const VERSION_LABELS: [&str; 2] = ["version", "app.kubernetes.io/version"];
/// This many addresses of one /24 are allowed as the /24.
pub const WORLD_COLLAPSE: usize = 4;
/// A path segment followed by more than this many different segments becomes `prefix/.*`.
pub const PATH_FANOUT: usize = 3;
/// More than this many names one label below the same parent become `*.parent`.
pub const DNS_FANOUT: usize = 3;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// networking.k8s.io/v1 NetworkPolicy: no HTTP rules, no entities (said in comments).
    Kubernetes,
    /// palisade.io/v1 NetworkPolicy.
    #[default]
    Palisade,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "k8s" | "kubernetes" => Some(Format::Kubernetes),
            "palisade" => Some(Format::Palisade),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Only policies for workloads of this namespace.
    pub namespace: Option<String>,
    pub format: Format,
}

/// The suggested manifest and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    pub yaml: String,
    pub policies: usize,
    pub rules: usize,
    /// Flows (connections and requests) behind the rules.
    pub flows: u64,
}

/// A peer as a rule names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Peer {
    Workload {
        namespace: String,
        selector: Labels,
    },
    Cidr(Ipv4Network),
    /// Addresses that answers to the group's lookups of these names held.
    Fqdn(BTreeSet<String>),
    Host,
    Reserved(String),
}

/// What was seen of one (protocol, port) or one HTTP method with a peer.
#[derive(Clone, Debug, Default)]
struct Tally {
    count: u64,
    first: u64,
    last: u64,
    verdicts: BTreeMap<FlowVerdict, u64>,
    /// Endpoints (`ns/name`) seen on the other side, or addresses.
    peers_seen: BTreeSet<String>,
}

impl Tally {
    fn add(&mut self, verdict: FlowVerdict, seen: &super::Seen, who: String) {
        if self.count == 0 {
            self.first = seen.first_seen;
            self.last = seen.last_seen;
        }
        self.count += seen.count;
        self.first = self.first.min(seen.first_seen);
        self.last = self.last.max(seen.last_seen);
        *self.verdicts.entry(verdict).or_default() += seen.count;
        if !who.is_empty() {
            self.peers_seen.insert(who);
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.peers_seen.extend(other.peers_seen.iter().cloned());
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.first = other.first;
            self.last = other.last;
        }
        self.count += other.count;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        for (v, n) in &other.verdicts {
            *self.verdicts.entry(*v).or_default() += n;
        }
    }

    fn words(&self, what: &str) -> String {
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .map(|(v, n)| format!("{} {n}", v.as_str()))
            .collect();
        format!(
            "{} {what}{} ({}), first seen {}, last seen {}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            verdicts.join(", "),
            rfc3339(self.first),
            rfc3339(self.last)
        )
    }
}

/// Paths seen, each with whether it was truncated.
type PathSet = BTreeSet<(String, bool)>;

/// One rule being built: a peer's ports, and its HTTP requests per port and method.
#[derive(Clone, Debug, Default)]
struct RuleAcc {
    /// Peer in words, as the flows named it.
    about: BTreeSet<String>,
    ports: BTreeMap<(u8, u16), Tally>,
    /// (port, method) -> paths (with whether each was truncated) and what was seen.
    http: BTreeMap<(u16, String), (PathSet, Tally)>,
    /// DNS server port -> names looked up there and what was seen.
    dns: BTreeMap<u16, BTreeMap<String, Tally>>,
    /// The group's lookups of the names a `toFQDNs` rule allows.
    lookups: BTreeMap<String, Tally>,
    /// Names whose answers held this rule's addresses (where they stay CIDRs).
    answered: BTreeSet<String>,
}

impl RuleAcc {
    fn merge(&mut self, other: RuleAcc) {
        self.about.extend(other.about);
        for (k, t) in other.ports {
            self.ports.entry(k).or_default().merge(&t);
        }
        for (k, (paths, t)) in other.http {
            let e = self.http.entry(k).or_default();
            e.0.extend(paths);
            e.1.merge(&t);
        }
        for (port, names) in other.dns {
            let e = self.dns.entry(port).or_default();
            for (name, t) in names {
                e.entry(name).or_default().merge(&t);
            }
        }
        for (name, t) in other.lookups {
            self.lookups.entry(name).or_default().merge(&t);
        }
        self.answered.extend(other.answered);
    }
}

/// Everything one policy will say.
#[derive(Clone, Debug, Default)]
struct Subject {
    members: BTreeSet<String>,
    flows: Tally,
    rules: BTreeMap<Direction, BTreeMap<Peer, RuleAcc>>,
}

fn protocol_name(p: u8) -> Option<&'static str> {
    match p {
        6 => Some("TCP"),
        17 => Some("UDP"),
        132 => Some("SCTP"),
        1 => Some("ICMP"),
        _ => None,
    }
}

/// The selector that names `labels` among `others` (the label sets of one namespace).
pub fn choose_selector(labels: &Labels, others: &[&Labels]) -> Labels {
    let unique = |sel: &Labels| {
        !others
            .iter()
            .any(|o| *o != labels && sel.iter().all(|(k, v)| o.get(k) == Some(v)))
    };
    let well_known: Labels = labels
        .iter()
        .filter(|(k, _)| WELL_KNOWN_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !well_known.is_empty() && unique(&well_known) {
        return well_known;
    }
    let stable: Labels = labels
        .iter()
        .filter(|(k, _)| !VERSION_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if unique(&stable) {
        return stable;
    }
    labels.clone()
}

/// A DNS-1123 name from a selector: `learned-` and its values, in well-known order first.
fn policy_name(selector: &Labels) -> String {
    let mut keys: Vec<&String> = selector.keys().collect();
    keys.sort_by_key(|k| {
        (
            WELL_KNOWN_LABELS
                .iter()
                .position(|w| w == k)
                .unwrap_or(WELL_KNOWN_LABELS.len()),
            (*k).clone(),
        )
    });
    let mut name = String::from("learned");
    for k in keys {
        name.push('-');
        name.push_str(&selector[k]);
    }
    if selector.is_empty() {
        name.push_str("-all");
    }
    let mut out = String::new();
    for c in name.to_ascii_lowercase().chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out.truncate(58);
    out.trim_end_matches('-').to_string()
}

/// Collapses paths: a prefix followed by more than `PATH_FANOUT` different segments becomes
/// `prefix/.*`; everything else stays exact. Returns anchored regular expressions, sorted.
pub fn collapse_paths(paths: &BTreeSet<(String, bool)>) -> Vec<String> {
    #[derive(Default)]
    struct Node {
        end: bool,
        truncated: bool,
        children: BTreeMap<String, Node>,
    }
    fn walk(node: &Node, prefix: &str, out: &mut BTreeSet<String>) {
        if node.truncated {
            out.insert(format!("{}.*", regex::escape(prefix)));
            return;
        }
        if node.end {
            let exact = if prefix.is_empty() { "/" } else { prefix };
            out.insert(regex::escape(exact));
        }
        if node.children.len() > PATH_FANOUT {
            out.insert(format!("{}/.*", regex::escape(prefix)));
            return;
        }
        for (seg, child) in &node.children {
            walk(child, &format!("{prefix}/{seg}"), out);
        }
    }
    let mut root = Node::default();
    for (path, truncated) in paths {
        let mut node = &mut root;
        for seg in path.split('/').skip(1) {
            node = node.children.entry(seg.to_string()).or_default();
        }
        node.end = true;
        node.truncated |= truncated;
    }
    let mut out = BTreeSet::new();
    walk(&root, "", &mut out);
    out.into_iter().collect()
}

/// A DNS selector of a suggested rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DnsSelector {
    MatchName(String),
    MatchPattern(String),
}

impl DnsSelector {
    fn text(&self) -> &str {
        match self {
            DnsSelector::MatchName(s) | DnsSelector::MatchPattern(s) => s,
        }
    }
}

/// The selectors for `names`: exact names, but more than `DNS_FANOUT` names one label below
/// the same parent become `*.parent` (a parent of two labels at least: never `*.com`).
/// Sorted by their text.
pub fn collapse_names(names: &BTreeSet<String>) -> Vec<DnsSelector> {
    let mut by_parent: BTreeMap<&str, usize> = BTreeMap::new();
    for name in names {
        if let Some((_, parent)) = name.split_once('.')
            && parent.contains('.')
        {
            *by_parent.entry(parent).or_default() += 1;
        }
    }
    let mut out: BTreeSet<DnsSelector> = BTreeSet::new();
    for name in names {
        match name.split_once('.') {
            Some((_, parent)) if by_parent.get(parent).is_some_and(|n| *n > DNS_FANOUT) => {
                out.insert(DnsSelector::MatchPattern(format!("*.{parent}")));
            }
            _ => {
                out.insert(DnsSelector::MatchName(name.clone()));
            }
        }
    }
    let mut out: Vec<DnsSelector> = out.into_iter().collect();
    out.sort_by(|a, b| a.text().cmp(b.text()).then(a.cmp(b)));
    out
}

fn yaml_str(s: &str) -> String {
    // A JSON string is a YAML double-quoted scalar.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

fn peer_words(p: &Peer) -> String {
    match p {
        Peer::Workload {
            namespace,
            selector,
        } => Group::Workload {
            namespace: namespace.clone(),
            labels: selector.clone(),
        }
        .to_string(),
        Peer::Cidr(net) => net.to_string(),
        Peer::Fqdn(names) => names.iter().cloned().collect::<Vec<_>>().join(", "),
        Peer::Host => "the node (host)".to_string(),
        Peer::Reserved(name) => format!("reserved:{name}"),
    }
}

/// Builds every subject's rules from the records.
fn subjects(snapshot: &LogSnapshot, opts: &Options) -> BTreeMap<(String, Labels), Subject> {
    let all_groups = snapshot
        .connections
        .iter()
        .flat_map(|r| [&r.endpoint, &r.peer])
        .chain(snapshot.http.iter().flat_map(|r| [&r.endpoint, &r.peer]))
        .chain(snapshot.dns.iter().flat_map(|r| [&r.endpoint, &r.server]));
    let by_ns = super::workloads_by_namespace(all_groups);
    let selector = |g: &Group| -> Option<(String, Labels)> {
        let Group::Workload { namespace, labels } = g else {
            return None;
        };
        let others = by_ns.get(namespace.as_str()).map_or(&[][..], Vec::as_slice);
        Some((namespace.clone(), choose_selector(labels, others)))
    };
    let peer_of = |g: &Group| -> Peer {
        match g {
            Group::Workload { .. } => {
                let (namespace, selector) = selector(g).unwrap_or_default();
                Peer::Workload {
                    namespace,
                    selector,
                }
            }
            Group::World { address } => Peer::Cidr(Ipv4Network::from(*address)),
            Group::Host => Peer::Host,
            Group::Reserved { name } => Peer::Reserved(name.clone()),
        }
    };
    let wanted = |g: &Group| {
        g.namespace()
            .is_some_and(|ns| opts.namespace.as_deref().is_none_or(|want| want == ns))
    };
    let mut out: BTreeMap<(String, Labels), Subject> = BTreeMap::new();
    let who = |sample: &super::Sample| {
        if sample.peer.is_empty() {
            sample.peer_address.to_string()
        } else {
            sample.peer.clone()
        }
    };
    // Per subject: the names its answered lookups asked for, and the addresses they held.
    let mut answered: BTreeMap<(String, Labels), BTreeMap<Ipv4Addr, BTreeSet<String>>> =
        BTreeMap::new();
    let mut lookups: BTreeMap<(String, Labels), BTreeMap<String, Tally>> = BTreeMap::new();
    for r in &snapshot.dns {
        if !r.verdict.observed() || !wanted(&r.endpoint) || protocol_name(r.protocol).is_none() {
            continue;
        }
        let Some(key) = selector(&r.endpoint) else {
            continue;
        };
        for a in &r.answers {
            answered
                .entry(key.clone())
                .or_default()
                .entry(*a)
                .or_default()
                .insert(r.name.clone());
        }
        lookups
            .entry(key.clone())
            .or_default()
            .entry(r.name.clone())
            .or_default()
            .add(r.verdict, &r.seen, who(&r.seen.sample));
        let subject = out.entry(key).or_default();
        subject.members.insert(r.seen.sample.endpoint.clone());
        subject.flows.add(r.verdict, &r.seen, String::new());
        let rule = subject
            .rules
            .entry(Direction::Egress)
            .or_default()
            .entry(peer_of(&r.server))
            .or_default();
        rule.about.insert(r.server.to_string());
        rule.dns
            .entry(r.port)
            .or_default()
            .entry(r.name.clone())
            .or_default()
            .add(r.verdict, &r.seen, who(&r.seen.sample));
        // The port itself is allowed too (the DNS proxy's flow carries the lookups).
        rule.ports.entry((r.protocol, r.port)).or_default();
    }
    for r in &snapshot.connections {
        if !r.verdict.observed() || !wanted(&r.endpoint) || protocol_name(r.protocol).is_none() {
            continue;
        }
        let Some(key) = selector(&r.endpoint) else {
            continue;
        };
        // Egress to an address the group's own lookups were answered: by name.
        let names = match (&r.direction, &r.peer) {
            (Direction::Egress, Group::World { address }) => {
                answered.get(&key).and_then(|a| a.get(address)).cloned()
            }
            _ => None,
        };
        let subject = out.entry(key).or_default();
        subject.members.insert(r.seen.sample.endpoint.clone());
        subject.flows.add(r.verdict, &r.seen, String::new());
        let peer = match (&names, opts.format) {
            (Some(names), Format::Palisade) => Peer::Fqdn(names.clone()),
            _ => peer_of(&r.peer),
        };
        let rule = subject
            .rules
            .entry(r.direction)
            .or_default()
            .entry(peer)
            .or_default();
        rule.about.insert(r.peer.to_string());
        if let Some(names) = names {
            rule.answered.extend(names);
        }
        rule.ports.entry((r.protocol, r.port)).or_default().add(
            r.verdict,
            &r.seen,
            who(&r.seen.sample),
        );
    }
    for r in &snapshot.http {
        if !r.verdict.observed() || !wanted(&r.endpoint) {
            continue;
        }
        let Some(key) = selector(&r.endpoint) else {
            continue;
        };
        let subject = out.entry(key).or_default();
        subject.members.insert(r.seen.sample.endpoint.clone());
        subject.flows.add(r.verdict, &r.seen, String::new());
        let rule = subject
            .rules
            .entry(r.direction)
            .or_default()
            .entry(peer_of(&r.peer))
            .or_default();
        rule.about.insert(r.peer.to_string());
        let e = rule.http.entry((r.port, r.method.clone())).or_default();
        e.0.insert((r.path.clone(), r.path_truncated));
        e.1.add(r.verdict, &r.seen, who(&r.seen.sample));
        // The port itself is allowed too (the proxy's connection carries the requests).
        rule.ports.entry((6, r.port)).or_default();
    }
    for (key, subject) in &mut out {
        for rules in subject.rules.values_mut() {
            collapse_world(rules);
            for (peer, acc) in rules.iter_mut() {
                if let Peer::Fqdn(names) = peer {
                    for name in names {
                        if let Some(t) = lookups.get(key).and_then(|l| l.get(name)) {
                            acc.lookups.insert(name.clone(), t.clone());
                        }
                    }
                }
            }
        }
    }
    out
}

/// Replaces the /32s of any /24 with `WORLD_COLLAPSE` or more of them by the /24.
fn collapse_world(rules: &mut BTreeMap<Peer, RuleAcc>) {
    let mut per_24: BTreeMap<Ipv4Network, Vec<Peer>> = BTreeMap::new();
    for p in rules.keys() {
        if let Peer::Cidr(net) = p
            && net.prefix() == 32
        {
            let o = net.ip().octets();
            let block = Ipv4Network::new(Ipv4Addr::new(o[0], o[1], o[2], 0), 24)
                .expect("a /24 is a valid prefix");
            per_24.entry(block).or_default().push(p.clone());
        }
    }
    for (block, members) in per_24 {
        if members.len() < WORLD_COLLAPSE {
            continue;
        }
        let mut merged = rules.remove(&Peer::Cidr(block)).unwrap_or_default();
        for m in members {
            if let Some(acc) = rules.remove(&m) {
                merged.merge(acc);
            }
        }
        rules.insert(Peer::Cidr(block), merged);
    }
}

struct Writer {
    out: String,
    rules: usize,
}

impl Writer {
    fn line(&mut self, indent: usize, text: &str) {
        let _ = writeln!(self.out, "{:indent$}{text}", "");
    }

    fn labels(&mut self, indent: usize, labels: &Labels) {
        if labels.is_empty() {
            self.line(indent, "matchLabels: {}");
            return;
        }
        self.line(indent, "matchLabels:");
        for (k, v) in labels {
            self.line(indent + 2, &format!("{}: {}", yaml_str(k), yaml_str(v)));
        }
    }

    /// Comment lines naming the flows behind one rule.
    fn comment(&mut self, indent: usize, direction: Direction, peer: &Peer, acc: &RuleAcc) {
        let arrow = match direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        let mut seen = acc.ports.values().fold(Tally::default(), |mut t, x| {
            t.merge(x);
            t
        });
        for (_, t) in acc.http.values() {
            seen.peers_seen.extend(t.peers_seen.iter().cloned());
        }
        let examples: Vec<&String> = seen.peers_seen.iter().take(3).collect();
        let more = seen.peers_seen.len().saturating_sub(3);
        let examples = if examples.is_empty() {
            String::new()
        } else {
            format!(
                " (seen: {}{})",
                examples
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        };
        self.line(indent, &format!("# {arrow} {}{examples}", peer_words(peer)));
        for ((proto, port), t) in &acc.ports {
            if t.count == 0 {
                continue;
            }
            let what = match protocol_name(*proto) {
                Some("ICMP") => "ICMP".to_string(),
                Some(p) => format!("{port}/{p}"),
                None => format!("protocol {proto}"),
            };
            self.line(indent, &format!("#   {what}: {}", t.words("connection")));
        }
        for (name, t) in &acc.lookups {
            self.line(
                indent,
                &format!("#   lookups of {name}: {}", t.words("answered lookup")),
            );
        }
        if !acc.answered.is_empty() && !matches!(peer, Peer::Fqdn(_)) {
            let names: Vec<&str> = acc.answered.iter().map(String::as_str).collect();
            self.line(
                indent,
                &format!("#   answered to its lookups of {}", names.join(", ")),
            );
        }
        for (port, names) in &acc.dns {
            let total = names.values().fold(Tally::default(), |mut t, x| {
                t.merge(x);
                t
            });
            let list: Vec<&str> = names.keys().take(4).map(String::as_str).collect();
            let more = names.len().saturating_sub(4);
            self.line(
                indent,
                &format!(
                    "#   DNS on {port}: {}{} — {}",
                    list.join(", "),
                    if more > 0 {
                        format!(" and {more} more names")
                    } else {
                        String::new()
                    },
                    total.words("lookup")
                ),
            );
        }
        for ((port, method), (paths, t)) in &acc.http {
            let list: Vec<&str> = paths.iter().take(4).map(|(p, _)| p.as_str()).collect();
            let more = paths.len().saturating_sub(4);
            self.line(
                indent,
                &format!(
                    "#   HTTP {method} on {port}: {}{} — {}",
                    list.join(", "),
                    if more > 0 {
                        format!(" and {more} more paths")
                    } else {
                        String::new()
                    },
                    t.words("request")
                ),
            );
        }
    }
}

/// The (protocol, port) pairs a rule allows, TCP/UDP/SCTP only, and whether ICMP was seen.
fn split_ports(acc: &RuleAcc) -> (Vec<(u8, u16)>, bool) {
    let mut l4 = Vec::new();
    let mut icmp = false;
    for (proto, port) in acc.ports.keys() {
        match protocol_name(*proto) {
            Some("ICMP") => icmp = true,
            Some(_) if *port != 0 => l4.push((*proto, *port)),
            _ => {}
        }
    }
    (l4, icmp)
}

fn write_palisade_rule(w: &mut Writer, direction: Direction, peer: &Peer, acc: &RuleAcc) {
    let (from, cidr_key, entities) = match direction {
        Direction::Ingress => ("fromEndpoints", "fromCIDR", "fromEntities"),
        Direction::Egress => ("toEndpoints", "toCIDR", "toEntities"),
    };
    let (l4, icmp) = split_ports(acc);
    let peer_lines = |w: &mut Writer| match peer {
        Peer::Workload {
            namespace,
            selector,
        } => {
            w.line(2, &format!("- {from}:"));
            let mut labels = selector.clone();
            labels.insert(
                format!("k8s:{}", crate::labels::NAMESPACE_LABEL),
                namespace.clone(),
            );
            w.line(4, "- matchLabels:");
            for (k, v) in &labels {
                w.line(8, &format!("{}: {}", yaml_str(k), yaml_str(v)));
            }
        }
        Peer::Cidr(net) => {
            w.line(2, &format!("- {cidr_key}:"));
            w.line(4, &format!("- {}", yaml_str(&net.to_string())));
        }
        Peer::Fqdn(names) => {
            w.line(2, "- toFQDNs:");
            for name in names {
                w.line(4, &format!("- matchName: {}", yaml_str(name)));
            }
        }
        Peer::Host => {
            w.line(2, &format!("- {entities}:"));
            w.line(4, "- host");
        }
        Peer::Reserved(name) => {
            w.line(2, &format!("- {entities}:"));
            w.line(4, &format!("- {}", yaml_str(name)));
        }
    };
    w.comment(2, direction, peer, acc);
    if !l4.is_empty() {
        w.rules += 1;
        peer_lines(w);
        w.line(4, "toPorts:");
        let http_ports: BTreeSet<u16> = acc.http.keys().map(|(p, _)| *p).collect();
        let plain: Vec<&(u8, u16)> = l4
            .iter()
            .filter(|(proto, port)| !(*proto == 6 && http_ports.contains(port)))
            .filter(|(proto, port)| !(matches!(proto, 6 | 17) && acc.dns.contains_key(port)))
            .collect();
        if !plain.is_empty() {
            w.line(4, "- ports:");
            for (proto, port) in plain {
                w.line(6, &format!("- port: \"{port}\""));
                w.line(
                    8,
                    &format!("protocol: {}", protocol_name(*proto).unwrap_or("TCP")),
                );
            }
        }
        for port in &http_ports {
            w.line(4, "- ports:");
            w.line(6, &format!("- port: \"{port}\""));
            w.line(8, "protocol: TCP");
            w.line(6, "rules:");
            w.line(8, "http:");
            for ((p, method), (paths, _)) in &acc.http {
                if p != port {
                    continue;
                }
                for path in collapse_paths(paths) {
                    w.line(
                        8,
                        &format!("- method: {}", yaml_str(&regex::escape(method))),
                    );
                    w.line(10, &format!("path: {}", yaml_str(&path)));
                }
            }
        }
        for (port, names) in &acc.dns {
            w.line(4, "- ports:");
            w.line(6, &format!("- port: \"{port}\""));
            w.line(8, "protocol: ANY");
            w.line(6, "rules:");
            w.line(8, "dns:");
            let names: BTreeSet<String> = names.keys().cloned().collect();
            for sel in collapse_names(&names) {
                match sel {
                    DnsSelector::MatchName(n) => {
                        w.line(8, &format!("- matchName: {}", yaml_str(&n)));
                    }
                    DnsSelector::MatchPattern(p) => {
                        w.line(8, &format!("- matchPattern: {}", yaml_str(&p)));
                    }
                }
            }
        }
    }
    if icmp {
        w.rules += 1;
        peer_lines(w);
        w.line(4, "icmps:");
        w.line(4, "- fields:");
        w.line(6, "- type: EchoRequest");
        w.line(8, "family: IPv4");
    }
}

fn write_k8s_rule(w: &mut Writer, direction: Direction, peer: &Peer, acc: &RuleAcc) {
    let (key, peers_key) = match direction {
        Direction::Ingress => ("ingress", "from"),
        Direction::Egress => ("egress", "to"),
    };
    let _ = key;
    let (l4, icmp) = split_ports(acc);
    w.comment(2, direction, peer, acc);
    let expressible = matches!(peer, Peer::Workload { .. } | Peer::Cidr(_));
    if !expressible {
        w.line(
            2,
            "# (not expressible as a Kubernetes NetworkPolicy peer: use --format palisade)",
        );
        return;
    }
    if icmp {
        w.line(
            2,
            "# (ICMP is not expressible in a Kubernetes NetworkPolicy: use --format palisade)",
        );
    }
    if !acc.http.is_empty() {
        w.line(
            2,
            "# (HTTP rules are not expressible in a Kubernetes NetworkPolicy: its ports are allowed whole; use --format palisade)",
        );
    }
    if !acc.dns.is_empty() {
        w.line(
            2,
            "# (DNS rules are not expressible in a Kubernetes NetworkPolicy: the DNS port is allowed whole; use --format palisade)",
        );
    }
    if !acc.answered.is_empty() {
        w.line(
            2,
            "# (toFQDNs is not expressible in a Kubernetes NetworkPolicy: the addresses answered are allowed by CIDR; use --format palisade)",
        );
    }
    if l4.is_empty() {
        return;
    }
    w.rules += 1;
    w.line(2, &format!("- {peers_key}:"));
    match peer {
        Peer::Workload {
            namespace,
            selector,
        } => {
            w.line(4, "- podSelector:");
            w.labels(8, selector);
            w.line(6, "namespaceSelector:");
            w.line(8, "matchLabels:");
            w.line(
                10,
                &format!(
                    "{}: {}",
                    yaml_str(NAMESPACE_NAME_LABEL),
                    yaml_str(namespace)
                ),
            );
        }
        Peer::Cidr(net) => {
            w.line(4, "- ipBlock:");
            w.line(8, &format!("cidr: {}", yaml_str(&net.to_string())));
        }
        Peer::Fqdn(_) | Peer::Host | Peer::Reserved(_) => {}
    }
    w.line(4, "ports:");
    for (proto, port) in &l4 {
        w.line(
            4,
            &format!("- protocol: {}", protocol_name(*proto).unwrap_or("TCP")),
        );
        w.line(6, &format!("port: {port}"));
    }
}

/// Least-privilege policies for what `snapshot` records (see the module's documentation).
pub fn suggest(snapshot: &LogSnapshot, opts: &Options) -> Suggestion {
    let subjects = subjects(snapshot, opts);
    let mut w = Writer {
        out: String::new(),
        rules: 0,
    };
    let total: u64 = subjects.values().map(|s| s.flows.count).sum();
    let _ = writeln!(
        w.out,
        "# Suggested by `palisade policy suggest` from {total} observed flows{}.",
        opts.namespace
            .as_ref()
            .map(|ns| format!(" of namespace {ns}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        w.out,
        "# Each rule allows one peer seen in the flows, on the ports seen; anything else is denied."
    );
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    let mut policies = 0;
    for ((namespace, selector), subject) in &subjects {
        let mut name = policy_name(selector);
        let mut n = 2;
        while names.contains(&(namespace.clone(), name.clone())) {
            name = format!("{}-{n}", policy_name(selector));
            n += 1;
        }
        names.insert((namespace.clone(), name.clone()));
        policies += 1;
        w.line(0, "---");
        let members: Vec<&str> = subject.members.iter().take(5).map(String::as_str).collect();
        let more = subject.members.len().saturating_sub(5);
        w.line(
            0,
            &format!(
                "# {} (seen: {}{}): {}",
                Group::Workload {
                    namespace: namespace.clone(),
                    labels: selector.clone()
                },
                members.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                },
                subject.flows.words("flow")
            ),
        );
        match opts.format {
            Format::Palisade => {
                w.line(0, "apiVersion: palisade.io/v1");
                w.line(0, "kind: NetworkPolicy");
            }
            Format::Kubernetes => {
                w.line(0, "apiVersion: networking.k8s.io/v1");
                w.line(0, "kind: NetworkPolicy");
            }
        }
        w.line(0, "metadata:");
        w.line(2, &format!("name: {}", yaml_str(&name)));
        w.line(2, &format!("namespace: {}", yaml_str(namespace)));
        w.line(0, "spec:");
        let empty = BTreeMap::new();
        match opts.format {
            Format::Palisade => {
                w.line(2, "endpointSelector:");
                w.labels(4, selector);
                w.line(2, "enableDefaultDeny:");
                w.line(4, "ingress: true");
                w.line(4, "egress: true");
                for direction in [Direction::Ingress, Direction::Egress] {
                    let rules = subject.rules.get(&direction).unwrap_or(&empty);
                    if rules.is_empty() {
                        continue;
                    }
                    w.line(2, &format!("{direction}:"));
                    for (peer, acc) in rules {
                        write_palisade_rule(&mut w, direction, peer, acc);
                    }
                }
            }
            Format::Kubernetes => {
                w.line(2, "podSelector:");
                w.labels(4, selector);
                w.line(2, "policyTypes:");
                w.line(2, "- Ingress");
                w.line(2, "- Egress");
                for direction in [Direction::Ingress, Direction::Egress] {
                    let rules = subject.rules.get(&direction).unwrap_or(&empty);
                    let before = w.out.len();
                    let rules_before = w.rules;
                    w.line(2, &format!("{direction}:"));
                    for (peer, acc) in rules {
                        write_k8s_rule(&mut w, direction, peer, acc);
                    }
                    if w.rules == rules_before {
                        // Nothing expressible: keep the comments, deny everything.
                        let comments = w.out.split_off(before);
                        for l in comments.lines().skip(1) {
                            w.out.push_str(l);
                            w.out.push('\n');
                        }
                        w.line(2, &format!("{direction}: []"));
                    }
                }
            }
        }
    }
    if policies == 0 {
        w.line(0, "# No observed flows: nothing to suggest.");
    }
    Suggestion {
        yaml: w.out,
        policies,
        rules: w.rules,
        flows: total,
    }
}

/// Records that `policy suggest --since` keeps: last seen at or after `since`.
pub fn seen_since(snapshot: &LogSnapshot, since: u64) -> LogSnapshot {
    LogSnapshot {
        connections: snapshot
            .connections
            .iter()
            .filter(|r| r.seen.last_seen >= since)
            .cloned()
            .collect::<Vec<ConnectionRecord>>(),
        http: snapshot
            .http
            .iter()
            .filter(|r| r.seen.last_seen >= since)
            .cloned()
            .collect::<Vec<HttpRecord>>(),
        dns: snapshot
            .dns
            .iter()
            .filter(|r| r.seen.last_seen >= since)
            .cloned()
            .collect(),
        not_kept: snapshot.not_kept,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::compile::{CompileInput, RuleTable, Settings, compile_with_l7, policy_cidrs};
    use crate::endpoint::{Endpoint, EndpointId};
    use crate::identity::{IdentityAllocator, workload_identity_labels};
    use crate::l7::{ProxyPolicy, RequestView};
    use crate::learn::{ConnectionLog, LogLimits, Observation, Sample};
    use crate::manifest::parse_manifests;
    use crate::mapstate::Verdict;

    /// A three-tier shop in `shop`, a batch job in `ops` that reads the db, a world API.
    struct Pod {
        ns: &'static str,
        name: &'static str,
        labels: &'static [(&'static str, &'static str)],
        ip: [u8; 4],
    }

    const PODS: [Pod; 7] = [
        Pod {
            ns: "shop",
            name: "web-1",
            labels: &[
                ("app", "web"),
                ("tier", "front"),
                ("pod-template-hash", "aa11"),
            ],
            ip: [10, 200, 0, 2],
        },
        Pod {
            ns: "shop",
            name: "web-2",
            labels: &[
                ("app", "web"),
                ("tier", "front"),
                ("pod-template-hash", "bb22"),
            ],
            ip: [10, 200, 0, 3],
        },
        Pod {
            ns: "shop",
            name: "api-1",
            labels: &[("app", "api"), ("tier", "back"), ("version", "v2")],
            ip: [10, 200, 0, 4],
        },
        Pod {
            ns: "shop",
            name: "db-1",
            labels: &[("app", "db"), ("tier", "data")],
            ip: [10, 200, 0, 5],
        },
        Pod {
            ns: "ops",
            name: "backup-1",
            labels: &[("app", "backup")],
            ip: [10, 200, 0, 6],
        },
        Pod {
            ns: "shop",
            name: "stranger-1",
            labels: &[("app", "stranger")],
            ip: [10, 200, 0, 7],
        },
        Pod {
            ns: "kube-system",
            name: "dns-1",
            labels: &[("k8s-app", "kube-dns")],
            ip: [10, 200, 0, 53],
        },
    ];
    const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    fn pod(name: &str) -> &'static Pod {
        PODS.iter().find(|p| p.name == name).unwrap()
    }

    fn group(p: &Pod) -> Group {
        let labels: Vec<String> = p
            .labels
            .iter()
            .map(|(k, v)| format!("k8s:{k}={v}"))
            .chain([format!("k8s:io.kubernetes.pod.namespace={}", p.ns)])
            .collect();
        Group::of_peer(300, &labels, Ipv4Addr::from(p.ip))
    }

    /// Both sides of a connection from `src` to `dst` (a pod or the world).
    fn connection(log: &mut ConnectionLog, src: &str, dst: Option<&str>, port: u16, t: u64) {
        let s = pod(src);
        let (dst_group, dst_ip, dst_name) = match dst {
            Some(d) => (
                group(pod(d)),
                Ipv4Addr::from(pod(d).ip),
                format!("{}/{d}", pod(d).ns),
            ),
            None => (Group::World { address: WORLD }, WORLD, String::new()),
        };
        let sample = |endpoint: String, peer_address, peer: String| Sample {
            endpoint,
            peer_address,
            peer,
            rule: String::new(),
        };
        log.record(
            Observation {
                endpoint: group(s),
                direction: Direction::Egress,
                peer: dst_group.clone(),
                protocol: 6,
                port,
                verdict: FlowVerdict::Forwarded,
                http: None,
                sample: sample(format!("{}/{src}", s.ns), dst_ip, dst_name.clone()),
            },
            t,
        );
        if dst.is_some() {
            log.record(
                Observation {
                    endpoint: dst_group,
                    direction: Direction::Ingress,
                    peer: group(s),
                    protocol: 6,
                    port,
                    verdict: FlowVerdict::Forwarded,
                    http: None,
                    sample: sample(dst_name, Ipv4Addr::from(s.ip), format!("{}/{src}", s.ns)),
                },
                t,
            );
        }
    }

    fn request(log: &mut ConnectionLog, src: &str, dst: &str, method: &str, path: &str, t: u64) {
        let (s, d) = (pod(src), pod(dst));
        log.record(
            Observation {
                endpoint: group(d),
                direction: Direction::Ingress,
                peer: group(s),
                protocol: 6,
                port: 8080,
                verdict: FlowVerdict::Forwarded,
                http: Some((method.into(), path.into())),
                sample: Sample {
                    endpoint: format!("{}/{dst}", d.ns),
                    peer_address: Ipv4Addr::from(s.ip),
                    peer: format!("{}/{src}", s.ns),
                    rule: String::new(),
                },
            },
            t,
        );
    }

    fn traffic() -> LogSnapshot {
        let mut log = ConnectionLog::new(LogLimits::default());
        let mut t = 1_700_000_000;
        for web in ["web-1", "web-2"] {
            connection(&mut log, web, Some("api-1"), 8080, t);
            t += 1;
        }
        connection(&mut log, "api-1", Some("db-1"), 5432, t);
        connection(&mut log, "backup-1", Some("db-1"), 5432, t + 1);
        connection(&mut log, "api-1", None, 443, t + 2);
        for (m, p) in [
            ("GET", "/api/products/1"),
            ("GET", "/api/products/2"),
            ("GET", "/api/products/3"),
            ("GET", "/api/products/4"),
            ("GET", "/api/cart"),
            ("POST", "/api/cart"),
            ("GET", "/healthz"),
        ] {
            request(&mut log, "web-1", "api-1", m, p, t + 3);
        }
        // Dropped flows are not learned.
        let mut dropped = Observation {
            endpoint: group(pod("db-1")),
            direction: Direction::Ingress,
            peer: group(pod("stranger-1")),
            protocol: 6,
            port: 5432,
            verdict: FlowVerdict::Dropped,
            http: None,
            sample: Sample {
                endpoint: "shop/db-1".into(),
                peer_address: Ipv4Addr::from(pod("stranger-1").ip),
                peer: "shop/stranger-1".into(),
                rule: String::new(),
            },
        };
        log.record(dropped.clone(), t + 4);
        dropped.direction = Direction::Egress;
        dropped.endpoint = group(pod("stranger-1"));
        dropped.peer = group(pod("db-1"));
        log.record(dropped, t + 4);
        log.snapshot()
    }

    /// The cluster of `PODS` with `yaml` applied: map state and proxy policy.
    fn enforce(
        yaml: &str,
    ) -> (
        crate::mapstate::MapState,
        ProxyPolicy,
        BTreeMap<&'static str, EndpointId>,
    ) {
        let (state, proxy, _, ids) = enforce_with_names(yaml, &crate::fqdn::LearnedNames::new());
        (state, proxy, ids)
    }

    /// Like `enforce`, with these names learned from DNS answers; and the DNS proxy's policy.
    fn enforce_with_names(
        yaml: &str,
        names: &crate::fqdn::LearnedNames,
    ) -> (
        crate::mapstate::MapState,
        ProxyPolicy,
        crate::l7::DnsPolicy,
        BTreeMap<&'static str, EndpointId>,
    ) {
        let policies: BTreeMap<_, _> = parse_manifests(yaml)
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect();
        let mut alloc = IdentityAllocator::default();
        let mut endpoints = BTreeMap::new();
        let mut ids = BTreeMap::new();
        for (i, p) in PODS.iter().enumerate() {
            let pod_labels: Labels = p
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let ns_labels: Labels = [(NAMESPACE_NAME_LABEL.to_string(), p.ns.to_string())].into();
            let identity = alloc
                .acquire(&workload_identity_labels(p.ns, &ns_labels, &pod_labels))
                .unwrap();
            let id = EndpointId(u32::try_from(i).unwrap() + 1);
            ids.insert(p.name, id);
            endpoints.insert(
                id,
                Endpoint {
                    id,
                    name: p.name.into(),
                    namespace: p.ns.into(),
                    identity,
                    ip: Ipv4Addr::from(p.ip),
                    ifindex: 10 + id.0,
                    named_ports: vec![],
                    link: crate::endpoint::LinkLayer::default(),
                },
            );
        }
        let mut cidrs = policy_cidrs(policies.values());
        cidrs.extend(crate::compile::fqdn_prefixes(policies.values(), names));
        alloc.sync_cidrs(&cidrs).unwrap();
        let table = alloc.table();
        let host = [Ipv4Addr::new(10, 200, 0, 1)];
        let input = CompileInput {
            endpoints: &endpoints,
            identities: table,
            policies: &policies,
            host_addresses: &host,
            remote: &BTreeMap::new(),
            fqdns: names,
            settings: Settings {
                proxy_port: Some(15001),
                dns_proxy_port: Some(15053),
                ..Settings::default()
            },
        };
        let (state, l7) = compile_with_l7(&input, &mut RuleTable::default());
        let proxy = ProxyPolicy::new(&l7, &state).unwrap();
        let dns = crate::l7::DnsPolicy::new(&l7, &state);
        (state, proxy, dns, ids)
    }

    fn allowed(
        state: &crate::mapstate::MapState,
        ids: &BTreeMap<&str, EndpointId>,
        src: &str,
        dst: Option<&str>,
        port: u16,
    ) -> bool {
        let s = pod(src);
        let dst_ip = dst.map_or(WORLD, |d| Ipv4Addr::from(pod(d).ip));
        let out = state
            .decide(ids[src], Direction::Egress, dst_ip, 6, port)
            .unwrap()
            .verdict;
        let ok = |v: Verdict| matches!(v, Verdict::Allowed | Verdict::Redirected { .. });
        let inn = match dst {
            Some(d) => ok(state
                .decide(ids[d], Direction::Ingress, Ipv4Addr::from(s.ip), 6, port)
                .unwrap()
                .verdict),
            None => true,
        };
        ok(out) && inn
    }

    struct Get<'a>(&'a str, &'a str);
    impl RequestView for Get<'_> {
        fn method(&self) -> &str {
            self.0
        }
        fn path(&self) -> &str {
            self.1
        }
        fn host(&self) -> Option<&str> {
            None
        }
        fn header(&self, _: &str) -> Option<&[u8]> {
            None
        }
    }

    #[test]
    fn the_suggestion_allows_what_was_seen_and_nothing_else() {
        let snap = traffic();
        let s = suggest(&snap, &Options::default());
        let (state, proxy, ids) = enforce(&s.yaml);
        // Seen: allowed, both sides.
        assert!(
            allowed(&state, &ids, "web-1", Some("api-1"), 8080),
            "{}",
            s.yaml
        );
        assert!(allowed(&state, &ids, "web-2", Some("api-1"), 8080));
        assert!(allowed(&state, &ids, "api-1", Some("db-1"), 5432));
        assert!(
            allowed(&state, &ids, "backup-1", Some("db-1"), 5432),
            "cross-namespace"
        );
        assert!(
            allowed(&state, &ids, "api-1", None, 443),
            "the world, by CIDR"
        );
        // Not seen: denied.
        assert!(!allowed(&state, &ids, "web-1", Some("db-1"), 5432));
        assert!(
            !allowed(&state, &ids, "stranger-1", Some("db-1"), 5432),
            "drops are not learned"
        );
        assert!(!allowed(&state, &ids, "api-1", Some("db-1"), 22));
        assert!(!allowed(&state, &ids, "web-1", None, 443));
        assert!(!allowed(&state, &ids, "db-1", Some("api-1"), 8080));
        // HTTP: the paths seen, four product ids collapsed into a prefix.
        let client = std::net::SocketAddrV4::new(Ipv4Addr::from(pod("web-1").ip), 40000);
        let api = std::net::SocketAddrV4::new(Ipv4Addr::from(pod("api-1").ip), 8080);
        for (m, p, ok) in [
            ("GET", "/api/products/1", true),
            ("GET", "/api/products/999", true),
            ("POST", "/api/cart", true),
            ("GET", "/healthz", true),
            ("DELETE", "/api/cart", false),
            ("POST", "/api/products/1", false),
            ("GET", "/admin", false),
        ] {
            assert_eq!(
                proxy.judge(client, api, &Get(m, p)).allowed,
                ok,
                "{m} {p}\n{}",
                s.yaml
            );
        }
        assert!(s.yaml.contains("\"/api/products/.*\""), "{}", s.yaml);
        assert!(
            !s.yaml.contains("pod-template-hash"),
            "unstable labels never select"
        );
        assert!(!s.yaml.contains("version"), "{}", s.yaml);
        assert!(!s.yaml.contains("web-1\""), "pod names never select");
        assert_eq!(s.policies, 4, "web, api, db, backup: {}", s.yaml);
    }

    #[test]
    fn the_kubernetes_format_applies_and_allows_the_same_ports() {
        let snap = traffic();
        let s = suggest(
            &snap,
            &Options {
                namespace: None,
                format: Format::Kubernetes,
            },
        );
        let (state, _, ids) = enforce(&s.yaml);
        assert!(
            allowed(&state, &ids, "web-1", Some("api-1"), 8080),
            "{}",
            s.yaml
        );
        assert!(allowed(&state, &ids, "backup-1", Some("db-1"), 5432));
        assert!(allowed(&state, &ids, "api-1", None, 443));
        assert!(!allowed(&state, &ids, "web-1", Some("db-1"), 5432));
        assert!(
            s.yaml.contains("HTTP rules are not expressible"),
            "{}",
            s.yaml
        );
        assert!(s.yaml.contains("kubernetes.io/metadata.name"));
    }

    #[test]
    fn the_same_records_give_the_same_bytes_and_comments_name_the_flows() {
        let snap = traffic();
        let a = suggest(&snap, &Options::default());
        let mut reversed = snap.clone();
        reversed.connections.reverse();
        reversed.http.reverse();
        assert_eq!(a, suggest(&reversed, &Options::default()));
        assert!(
            a.yaml
                .contains("# from shop/app=web,tier=front (seen: shop/web-1, shop/web-2)"),
            "{}",
            a.yaml
        );
        assert!(a.yaml.contains("8080/TCP: 2 connections (FORWARDED 2), first seen 2023-11-14T22:13:20Z, last seen 2023-11-14T22:13:21Z"), "{}", a.yaml);
    }

    #[test]
    fn a_namespace_filter_keeps_its_own_workloads_only() {
        let s = suggest(
            &traffic(),
            &Options {
                namespace: Some("ops".into()),
                format: Format::Palisade,
            },
        );
        assert_eq!(s.policies, 1, "{}", s.yaml);
        assert!(s.yaml.contains("namespace: \"ops\""));
        assert!(
            s.yaml
                .contains("\"k8s:io.kubernetes.pod.namespace\": \"shop\""),
            "{}",
            s.yaml
        );
        let none = suggest(
            &traffic(),
            &Options {
                namespace: Some("nowhere".into()),
                format: Format::Palisade,
            },
        );
        assert_eq!(none.policies, 0);
        assert!(
            parse_manifests(&none.yaml).is_ok_and(|p| p.is_empty()),
            "nothing to apply"
        );
    }

    #[test]
    fn selectors_use_well_known_labels_that_tell_groups_apart() {
        let l = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let web = l(&[("app", "web"), ("team", "blue"), ("version", "v1")]);
        let web2 = l(&[("app", "web"), ("team", "red")]);
        let db = l(&[("app", "db")]);
        assert_eq!(choose_selector(&db, &[&web, &db]), db);
        assert_eq!(choose_selector(&web, &[&web, &db]), l(&[("app", "web")]));
        // `app=web` would select the other web too: the stable labels say which.
        assert_eq!(
            choose_selector(&web, &[&web, &web2]),
            l(&[("app", "web"), ("team", "blue")])
        );
        assert_eq!(
            policy_name(&l(&[("tier", "front"), ("app", "web")])),
            "learned-web-front"
        );
        assert_eq!(policy_name(&Labels::new()), "learned-all");
    }

    #[test]
    fn paths_collapse_where_many_were_seen() {
        let set = |ps: &[&str]| ps.iter().map(|p| (p.to_string(), false)).collect();
        assert_eq!(
            collapse_paths(&set(&["/a/b", "/a/c"])),
            vec!["/a/b", "/a/c"]
        );
        assert_eq!(
            collapse_paths(&set(&["/u/1", "/u/2", "/u/3", "/u/4", "/v"])),
            vec!["/u/.*", "/v"]
        );
        assert_eq!(
            collapse_paths(&set(&["/", "/x.json"])),
            vec!["/", "/x\\.json"]
        );
        let truncated = [("/long/abc".to_string(), true)].into();
        assert_eq!(collapse_paths(&truncated), vec!["/long/abc.*"]);
    }

    #[test]
    fn many_world_addresses_of_one_block_become_the_block() {
        let mut log = ConnectionLog::new(LogLimits::default());
        for i in 1..=5u8 {
            log.record(
                Observation {
                    endpoint: group(pod("api-1")),
                    direction: Direction::Egress,
                    peer: Group::World {
                        address: Ipv4Addr::new(198, 51, 100, i),
                    },
                    protocol: 17,
                    port: 53,
                    verdict: FlowVerdict::Forwarded,
                    http: None,
                    sample: Sample {
                        endpoint: "shop/api-1".into(),
                        peer_address: Ipv4Addr::new(198, 51, 100, i),
                        peer: String::new(),
                        rule: String::new(),
                    },
                },
                1,
            );
        }
        let s = suggest(&log.snapshot(), &Options::default());
        assert!(s.yaml.contains("\"198.51.100.0/24\""), "{}", s.yaml);
        assert!(!s.yaml.contains("198.51.100.1/32"));
        assert_eq!(s.rules, 1);
    }

    const ANSWERED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const UNANSWERED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

    fn lookup(log: &mut ConnectionLog, src: &str, name: &str, answers: &[Ipv4Addr], t: u64) {
        let (s, d) = (pod(src), pod("dns-1"));
        log.record_dns(
            crate::learn::DnsObservation {
                endpoint: group(s),
                server: group(d),
                protocol: 17,
                port: 53,
                name: name.into(),
                answers: answers.to_vec(),
                verdict: FlowVerdict::Forwarded,
                sample: Sample {
                    endpoint: format!("{}/{src}", s.ns),
                    peer_address: Ipv4Addr::from(d.ip),
                    peer: "kube-system/dns-1".into(),
                    rule: String::new(),
                },
            },
            t,
        );
    }

    fn egress(log: &mut ConnectionLog, src: &str, to: Ipv4Addr, protocol: u8, port: u16, t: u64) {
        let s = pod(src);
        let (peer, name) = if to == Ipv4Addr::from(pod("dns-1").ip) {
            (group(pod("dns-1")), "kube-system/dns-1".to_string())
        } else {
            (Group::World { address: to }, String::new())
        };
        log.record(
            Observation {
                endpoint: group(s),
                direction: Direction::Egress,
                peer,
                protocol,
                port,
                verdict: FlowVerdict::Audit,
                http: None,
                sample: Sample {
                    endpoint: format!("{}/{src}", s.ns),
                    peer_address: to,
                    peer: name,
                    rule: String::new(),
                },
            },
            t,
        );
    }

    /// api-1 looks up a name and connects to its answer, looks up five CDN names (connecting to
    /// none), and connects to an address it never looked up.
    fn dns_traffic() -> LogSnapshot {
        let mut log = ConnectionLog::new(LogLimits::default());
        let t = 1_700_000_000;
        let dns = Ipv4Addr::from(pod("dns-1").ip);
        egress(&mut log, "api-1", dns, 17, 53, t);
        lookup(&mut log, "api-1", "api.example.test", &[ANSWERED], t);
        lookup(&mut log, "api-1", "api.example.test", &[ANSWERED], t + 5);
        egress(&mut log, "api-1", ANSWERED, 6, 443, t + 1);
        egress(&mut log, "api-1", ANSWERED, 6, 8443, t + 2);
        for i in 1..=5u8 {
            lookup(
                &mut log,
                "api-1",
                &format!("n{i}.cdn.example.test"),
                &[Ipv4Addr::new(198, 51, 100, i)],
                t + 3,
            );
        }
        egress(&mut log, "api-1", UNANSWERED, 6, 443, t + 4);
        log.snapshot()
    }

    #[test]
    fn answered_addresses_become_fqdn_rules_and_lookups_the_dns_rule() {
        let snap = dns_traffic();
        let s = suggest(&snap, &Options::default());
        let y = &s.yaml;
        assert!(
            y.contains("- toFQDNs:\n    - matchName: \"api.example.test\"\n"),
            "{y}"
        );
        assert!(
            !y.contains("192.0.2.10/32"),
            "answered: by name, not by address\n{y}"
        );
        assert!(
            y.contains("\"192.0.2.77/32\""),
            "never answered: a CIDR\n{y}"
        );
        assert!(
            y.contains("protocol: ANY\n      rules:\n        dns:\n"),
            "{y}"
        );
        assert!(y.contains("- matchPattern: \"*.cdn.example.test\""), "{y}");
        assert!(!y.contains("n1.cdn.example.test\""), "collapsed\n{y}");
        assert!(
            y.contains("#   lookups of api.example.test: 2 answered lookups (FORWARDED 2)"),
            "{y}"
        );
        assert!(
            y.contains("#   DNS on 53: api.example.test, n1.cdn.example.test"),
            "{y}"
        );
        // Applied, with the name learned as the DNS proxy would: what was seen passes, by
        // name; the DNS proxy answers exactly the names looked up.
        let names: crate::fqdn::LearnedNames =
            [("api.example.test".to_string(), [ANSWERED].into())].into();
        let (state, _, dns, ids) = enforce_with_names(y, &names);
        let out = |to: Ipv4Addr, proto: u8, port: u16| {
            matches!(
                state
                    .decide(ids["api-1"], Direction::Egress, to, proto, port)
                    .unwrap()
                    .verdict,
                Verdict::Allowed | Verdict::Redirected { .. }
            )
        };
        assert!(out(ANSWERED, 6, 443), "{y}");
        assert!(out(ANSWERED, 6, 8443));
        assert!(!out(ANSWERED, 6, 22), "ports seen only");
        assert!(out(UNANSWERED, 6, 443));
        assert!(
            !out(Ipv4Addr::new(198, 51, 100, 1), 6, 443),
            "looked up, never used"
        );
        assert!(out(Ipv4Addr::from(pod("dns-1").ip), 17, 53));
        assert!(
            out(Ipv4Addr::from(pod("dns-1").ip), 6, 53),
            "DNS over TCP too (ANY)"
        );
        let server = std::net::SocketAddrV4::new(Ipv4Addr::from(pod("dns-1").ip), 53);
        let client = Ipv4Addr::from(pod("api-1").ip);
        for (name, ok) in [
            ("api.example.test", true),
            ("n9.cdn.example.test", true),
            ("cdn.example.test", false),
            ("evil.example.test", false),
        ] {
            assert_eq!(
                dns.judge(client, server, 17, name).allowed,
                ok,
                "{name}\n{y}"
            );
        }
        // Deterministic.
        let mut reversed = snap.clone();
        reversed.dns.reverse();
        reversed.connections.reverse();
        assert_eq!(suggest(&reversed, &Options::default()), s);
    }

    #[test]
    fn the_kubernetes_format_keeps_answered_addresses_as_cidrs_and_says_why() {
        let s = suggest(
            &dns_traffic(),
            &Options {
                namespace: None,
                format: Format::Kubernetes,
            },
        );
        let y = &s.yaml;
        assert!(!y.contains("toFQDNs:"), "{y}");
        assert!(y.contains("cidr: \"192.0.2.10/32\""), "{y}");
        assert!(y.contains("toFQDNs is not expressible"), "{y}");
        assert!(y.contains("DNS rules are not expressible"), "{y}");
        let (state, _, ids) = enforce(y);
        assert!(
            state
                .decide(ids["api-1"], Direction::Egress, ANSWERED, 6, 443)
                .unwrap()
                .verdict
                == Verdict::Allowed
        );
    }

    #[test]
    fn many_names_under_one_parent_collapse_into_a_pattern() {
        let set = |ns: &[&str]| ns.iter().map(ToString::to_string).collect::<BTreeSet<_>>();
        let name = |n: &str| DnsSelector::MatchName(n.into());
        let pattern = |n: &str| DnsSelector::MatchPattern(n.into());
        assert_eq!(
            collapse_names(&set(&["b.example.test", "a.example.test"])),
            vec![name("a.example.test"), name("b.example.test")]
        );
        assert_eq!(
            collapse_names(&set(&[
                "a.x.test",
                "b.x.test",
                "c.x.test",
                "d.x.test",
                "x.test",
                "deep.a.x.test"
            ])),
            vec![pattern("*.x.test"), name("deep.a.x.test"), name("x.test")]
        );
        // Never a pattern for a whole top-level domain.
        assert_eq!(
            collapse_names(&set(&["a.com", "b.com", "c.com", "d.com"])).len(),
            4
        );
    }
}
