//! Map state: exactly what the datapath's maps should contain, as plain data. The compiler
//! produces it, `diff` turns two of them into ordered map operations, and `decide` answers a
//! policy question the way the BPF program does (used by `policy trace` and by tests).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::endpoint::{EndpointId, LinkLayer};
use crate::identity::Identity;
use crate::model::Direction;

/// Rule provenance id stored in each policy entry (see `compile::RuleTable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RuleId(pub u32);

impl RuleId {
    /// No rule: default verdicts.
    pub const NONE: RuleId = RuleId(0);
}

/// An aligned block of ports: the top `bits` bits of `port` are matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortPrefix {
    pub port: u16,
    pub bits: u8,
}

impl PortPrefix {
    pub const ANY: PortPrefix = PortPrefix { port: 0, bits: 0 };

    pub fn exact(port: u16) -> PortPrefix {
        PortPrefix { port, bits: 16 }
    }

    fn mask(bits: u8) -> u16 {
        if bits == 0 {
            0
        } else {
            u16::MAX << (16 - u32::from(bits))
        }
    }

    /// The same block's first port with the prefix applied (canonical form).
    pub fn canonical(self) -> PortPrefix {
        PortPrefix {
            port: self.port & Self::mask(self.bits),
            bits: self.bits,
        }
    }

    pub fn contains(self, port: u16) -> bool {
        port & Self::mask(self.bits) == self.port & Self::mask(self.bits)
    }

    /// First and last port of the block.
    pub fn range(self) -> (u16, u16) {
        let first = self.port & Self::mask(self.bits);
        (first, first | !Self::mask(self.bits))
    }

    /// The enclosing block one bit shorter, None for `ANY`.
    pub fn parent(self) -> Option<PortPrefix> {
        (self.bits > 0).then(|| {
            PortPrefix {
                port: self.port,
                bits: self.bits - 1,
            }
            .canonical()
        })
    }
}

/// Splits an inclusive port range into the fewest aligned blocks.
pub fn port_range_prefixes(start: u16, end: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut s, e) = (u32::from(start), u32::from(end));
    while s <= e {
        let mut size: u32 = if s == 0 {
            1 << 16
        } else {
            s & s.wrapping_neg()
        };
        while s + size - 1 > e {
            size >>= 1;
        }
        // `s <= e` fits in 16 bits, and the block is at most 2^16 ports wide.
        out.push(PortPrefix {
            port: u16::try_from(s).expect("s <= end"),
            bits: u8::try_from(16 - size.trailing_zeros()).expect("at most 16 bits"),
        });
        s += size;
    }
    out
}

/// Key of a policy map entry. `protocol: None` means any protocol (and then `port` is ANY).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyKey {
    pub endpoint: EndpointId,
    pub identity: Identity,
    pub direction: Direction,
    pub protocol: Option<u8>,
    pub port: PortPrefix,
}

impl PolicyKey {
    /// The next less specific key of the same endpoint, identity and direction.
    pub fn parent(self) -> Option<PolicyKey> {
        self.protocol?;
        Some(match self.port.parent() {
            Some(port) => PolicyKey { port, ..self },
            None => PolicyKey {
                protocol: None,
                port: PortPrefix::ANY,
                ..self
            },
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    Allow,
    /// Allow through the L7 proxy listening on this port.
    Redirect {
        proxy_port: u16,
    },
    Deny,
}

impl Action {
    /// Precedence: deny beats redirect beats allow.
    pub fn rank(self) -> u8 {
        match self {
            Action::Allow => 1,
            Action::Redirect { .. } => 2,
            Action::Deny => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Redirect { .. } => "redirect",
            Action::Deny => "deny",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyEntry {
    pub action: Action,
    pub rule: RuleId,
    /// What the policies in audit change here (`audit::compile` merges them in).
    #[serde(default)]
    pub staged: Staged,
}

/// How the policies in audit ("staged": evaluated, not enforced) differ from the policies in
/// force at one entry. The datapath enforces the policies in force and reports, as AUDIT, what
/// the staged ones would deny that those let through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Staged {
    /// No difference: `action` and `rule` are what every policy says here.
    #[default]
    Same,
    /// The policies in force allow it (`action` is allow); the staged ones would deny it, by
    /// `rule` (the allowing rule is not kept: what matches is audited, by the staged rule).
    Deny,
    /// Only the staged policies have an entry here: `action` (allow or deny, never redirect)
    /// and `rule` are theirs; for the policies in force nothing matches at this key. The
    /// datapath stores it with action 0, which never wins a lookup.
    Only,
}

impl PolicyEntry {
    /// The entry as the policies in force see it: None for `Staged::Only`.
    pub fn in_force(self) -> Option<PolicyEntry> {
        (self.staged != Staged::Only).then_some(self)
    }

    /// Whether the staged policies would deny what matches this entry.
    pub fn staged_denies(self) -> bool {
        match self.staged {
            Staged::Same => false,
            Staged::Deny => true,
            Staged::Only => self.action == Action::Deny,
        }
    }
}

/// Directions in which the staged policies (those in audit) put an endpoint in default deny
/// while the policies in force do not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StagedEnforcement {
    pub ingress: bool,
    pub egress: bool,
}

impl StagedEnforcement {
    pub fn get(self, d: Direction) -> bool {
        match d {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub ifindex: u32,
    pub identity: Identity,
    pub ip: Ipv4Addr,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub audit: bool,
    /// Default deny that only policies in audit ask for.
    #[serde(default)]
    pub staged: StagedEnforcement,
    #[serde(default)]
    pub link: LinkLayer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpcacheEntry {
    pub identity: Identity,
    pub endpoint: Option<EndpointId>,
    /// For endpoint addresses: alias identity of the most specific policy CIDR containing it.
    pub cidr_identity: Option<Identity>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapState {
    pub endpoints: BTreeMap<EndpointId, EndpointEntry>,
    pub ipcache: BTreeMap<Ipv4Network, IpcacheEntry>,
    pub policy: BTreeMap<PolicyKey, PolicyEntry>,
}

/// What the datapath would decide for a new connection, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// None: no entry matched.
    pub verdict: Verdict,
    pub enforced: bool,
    pub peer: IpcacheEntry,
    /// The entry that decided it (when one did).
    pub matched: Option<(PolicyKey, PolicyEntry)>,
    /// The policies in force allow it (`Verdict::Allowed`), but those in audit would deny it:
    /// the rule that would (`RuleId::NONE` for their default deny). The datapath forwards it
    /// as AUDIT (unless it goes through the L7 proxy).
    pub staged_deny: Option<RuleId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Redirected {
        proxy_port: u16,
    },
    /// Denied by an explicit deny rule.
    DeniedByRule,
    /// Enforced and nothing allows it.
    DeniedByDefault,
}

impl MapState {
    /// The ipcache answer for an address: longest prefix, `world` when nothing matches.
    pub fn ipcache_lookup(&self, addr: Ipv4Addr) -> IpcacheEntry {
        (0..=32u8)
            .rev()
            .find_map(|len| {
                let net = Ipv4Network::new(addr, len).ok()?;
                let net = Ipv4Network::new(net.network(), len).ok()?;
                self.ipcache.get(&net).copied()
            })
            .unwrap_or(IpcacheEntry {
                identity: Identity::WORLD,
                endpoint: None,
                cidr_identity: None,
            })
    }

    /// Longest-prefix match in the policy map for one identity, as the LPM trie answers.
    pub fn policy_lookup(
        &self,
        endpoint: EndpointId,
        identity: Identity,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Option<(PolicyKey, PolicyEntry)> {
        let mut key = Some(PolicyKey {
            endpoint,
            identity,
            direction,
            protocol: Some(protocol),
            port: PortPrefix::exact(port),
        });
        while let Some(k) = key {
            if let Some(e) = self.policy.get(&k) {
                return Some((k, *e));
            }
            key = k.parent();
        }
        None
    }

    /// The highest-precedence entry (deny > redirect > allow) across the peer's identity, the
    /// any-identity wildcard and the peer's CIDR alias, without a default: `best_match` in
    /// datapath-bpf/src/policy.rs.
    pub fn best_match(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: &IpcacheEntry,
        protocol: u8,
        port: u16,
    ) -> Option<(PolicyKey, PolicyEntry)> {
        self.best_match_staged(endpoint, direction, peer, protocol, port)
            .0
    }

    /// `best_match`, and what the staged policies say across the same lookups: the rule of
    /// the first entry (peer, wildcard, alias order) whose staged verdict is deny, and whether
    /// any entry matched at all (for the staged default deny). Entries only the staged
    /// policies have never win the first answer.
    pub fn best_match_staged(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: &IpcacheEntry,
        protocol: u8,
        port: u16,
    ) -> (Option<(PolicyKey, PolicyEntry)>, Option<RuleId>, bool) {
        let mut candidates = vec![peer.identity, Identity::ANY];
        candidates.extend(peer.cidr_identity);
        let mut best: Option<(PolicyKey, PolicyEntry)> = None;
        let mut staged_deny = None;
        let mut any = false;
        for id in candidates {
            let Some((key, entry)) = self.policy_lookup(endpoint, id, direction, protocol, port)
            else {
                continue;
            };
            any = true;
            if staged_deny.is_none() && entry.staged_denies() {
                staged_deny = Some(entry.rule);
            }
            if let Some(e) = entry.in_force()
                && best.is_none_or(|(_, b)| e.action.rank() > b.action.rank())
            {
                best = Some((key, e));
            }
        }
        (best, staged_deny, any)
    }

    /// The datapath's policy decision (see datapath-bpf/src/policy.rs) for a new connection
    /// of `endpoint` in `direction` with the peer at `peer_addr`.
    pub fn decide(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer_addr: Ipv4Addr,
        protocol: u8,
        port: u16,
    ) -> Option<Decision> {
        let ep = self.endpoints.get(&endpoint)?;
        let peer = self.ipcache_lookup(peer_addr);
        let enforced = match direction {
            Direction::Ingress => ep.ingress_enforced,
            Direction::Egress => ep.egress_enforced,
        };
        let (best, staged_rule, any) =
            self.best_match_staged(endpoint, direction, &peer, protocol, port);
        let verdict = match best.map(|(_, e)| e.action) {
            Some(Action::Deny) => Verdict::DeniedByRule,
            Some(Action::Redirect { proxy_port }) => Verdict::Redirected { proxy_port },
            Some(Action::Allow) => Verdict::Allowed,
            None if enforced => Verdict::DeniedByDefault,
            None => Verdict::Allowed,
        };
        let staged_deny = match verdict {
            Verdict::Allowed => {
                staged_rule.or((!any && ep.staged.get(direction)).then_some(RuleId::NONE))
            }
            _ => None,
        };
        Some(Decision {
            verdict,
            enforced,
            peer,
            matched: best,
            staged_deny,
        })
    }

    /// The L7 proxy port a TCP connection from `src` to `dst` (original direction) must take,
    /// as `endpoint`'s side decides it when the connection opens, or when a policy change
    /// re-checks it (`proxy_port_needed` in datapath-bpf/src/judge.rs): the side's own redirect,
    /// or, on a client's egress, the HTTP rules of a local destination's ingress; with the
    /// rule that redirects it. None when the connection goes direct, or when the endpoint is
    /// unknown.
    pub fn proxy_port_needed(
        &self,
        endpoint: EndpointId,
        scope: Direction,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        dport: u16,
    ) -> Option<(u16, RuleId)> {
        const TCP: u8 = 6;
        let peer_addr = match scope {
            Direction::Egress => dst,
            Direction::Ingress => src,
        };
        let own = self.decide(endpoint, scope, peer_addr, TCP, dport)?;
        if let (Verdict::Redirected { proxy_port }, Some((_, entry))) = (own.verdict, own.matched) {
            return Some((proxy_port, entry.rule));
        }
        if scope != Direction::Egress {
            return None;
        }
        let destination = self.ipcache_lookup(dst).endpoint?;
        let client = IpcacheEntry {
            identity: self.endpoints.get(&endpoint)?.identity,
            endpoint: Some(endpoint),
            cidr_identity: self.ipcache_lookup(src).cidr_identity,
        };
        match self.best_match(destination, Direction::Ingress, &client, TCP, dport) {
            Some((
                _,
                PolicyEntry {
                    action: Action::Redirect { proxy_port },
                    rule,
                    ..
                },
            )) => Some((proxy_port, rule)),
            _ => None,
        }
    }
}

/// Map operations taking one state to another, in the order they must be applied so that a
/// connection allowed before and after is never dropped in between: everything that adds or
/// widens goes in first, then endpoint flags, then what narrows or removes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDiff {
    pub policy_upserts: Vec<(PolicyKey, PolicyEntry)>,
    pub ipcache_upserts: Vec<(Ipv4Network, IpcacheEntry)>,
    pub endpoint_upserts: Vec<(EndpointId, EndpointEntry)>,
    pub endpoint_removals: Vec<(EndpointId, EndpointEntry)>,
    pub ipcache_removals: Vec<Ipv4Network>,
    pub policy_removals: Vec<PolicyKey>,
}

impl MapDiff {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of map operations.
    pub fn len(&self) -> usize {
        self.policy_upserts.len()
            + self.ipcache_upserts.len()
            + self.endpoint_upserts.len()
            + self.endpoint_removals.len()
            + self.ipcache_removals.len()
            + self.policy_removals.len()
    }
}

impl MapState {
    /// Applies every operation of `diff`.
    pub fn apply_diff(&mut self, diff: &MapDiff) {
        self.apply_prefix(diff, usize::MAX);
    }

    /// Applies the first `limit` operations of `diff`, in diff order: the state the maps are
    /// in when a diff fails part way (so the agent can roll back exactly what it wrote).
    pub fn apply_prefix(&mut self, diff: &MapDiff, limit: usize) {
        let mut left = limit;
        let mut take = || {
            if left == 0 {
                false
            } else {
                left -= 1;
                true
            }
        };
        for (k, v) in &diff.policy_upserts {
            if !take() {
                return;
            }
            self.policy.insert(*k, *v);
        }
        for (k, v) in &diff.ipcache_upserts {
            if !take() {
                return;
            }
            self.ipcache.insert(*k, *v);
        }
        for (k, v) in &diff.endpoint_upserts {
            if !take() {
                return;
            }
            self.endpoints.insert(*k, *v);
        }
        for (k, _) in &diff.endpoint_removals {
            if !take() {
                return;
            }
            self.endpoints.remove(k);
        }
        for k in &diff.ipcache_removals {
            if !take() {
                return;
            }
            self.ipcache.remove(k);
        }
        for k in &diff.policy_removals {
            if !take() {
                return;
            }
            self.policy.remove(k);
        }
    }
}

fn upserts<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    new.iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect()
}

fn removals<K: Ord + Copy, V: Copy>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Vec<(K, V)> {
    old.iter()
        .filter(|(k, _)| !new.contains_key(k))
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// What to write to take the maps from `old` to `new`.
pub fn diff(old: &MapState, new: &MapState) -> MapDiff {
    MapDiff {
        policy_upserts: upserts(&old.policy, &new.policy),
        ipcache_upserts: upserts(&old.ipcache, &new.ipcache),
        endpoint_upserts: upserts(&old.endpoints, &new.endpoints),
        endpoint_removals: removals(&old.endpoints, &new.endpoints),
        ipcache_removals: removals(&old.ipcache, &new.ipcache)
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
        policy_removals: removals(&old.policy, &new.policy)
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_split_into_aligned_blocks() {
        assert_eq!(port_range_prefixes(80, 80), vec![PortPrefix::exact(80)]);
        assert_eq!(port_range_prefixes(0, 65535), vec![PortPrefix::ANY]);
        let blocks = port_range_prefixes(1000, 2000);
        let covered: u32 = blocks
            .iter()
            .map(|b| {
                let (f, l) = b.range();
                u32::from(l - f) + 1
            })
            .sum();
        assert_eq!(covered, 1001);
        for p in [999u16, 2001] {
            assert!(!blocks.iter().any(|b| b.contains(p)));
        }
        for p in [1000u16, 1024, 1999, 2000] {
            assert_eq!(blocks.iter().filter(|b| b.contains(p)).count(), 1);
        }
        assert_eq!(
            port_range_prefixes(8080, 8081),
            vec![PortPrefix {
                port: 8080,
                bits: 15
            }]
        );
        assert_eq!(port_range_prefixes(1, 65535).len(), 16);
    }

    fn key(identity: u32, protocol: Option<u8>, port: PortPrefix) -> PolicyKey {
        PolicyKey {
            endpoint: EndpointId(1),
            identity: Identity(identity),
            direction: Direction::Ingress,
            protocol,
            port,
        }
    }

    #[test]
    fn key_parents_walk_from_port_to_any_protocol() {
        let mut k = Some(key(300, Some(6), PortPrefix::exact(80)));
        let mut n = 0;
        while let Some(cur) = k {
            n += 1;
            k = cur.parent();
        }
        // 16..=0 port bits for TCP, then any-protocol.
        assert_eq!(n, 18);
    }

    fn state_with(entries: &[(PolicyKey, Action)], enforced: bool) -> MapState {
        let mut s = MapState::default();
        s.endpoints.insert(
            EndpointId(1),
            EndpointEntry {
                ifindex: 10,
                identity: Identity(256),
                ip: Ipv4Addr::new(10, 0, 0, 1),
                ingress_enforced: enforced,
                egress_enforced: false,
                audit: false,
                staged: StagedEnforcement::default(),
                link: LinkLayer::default(),
            },
        );
        s.ipcache.insert(
            "10.0.0.2/32".parse().unwrap(),
            IpcacheEntry {
                identity: Identity(300),
                endpoint: Some(EndpointId(2)),
                cidr_identity: None,
            },
        );
        for (i, (k, a)) in entries.iter().enumerate() {
            s.policy.insert(
                *k,
                PolicyEntry {
                    action: *a,
                    rule: RuleId(u32::try_from(i).unwrap() + 1),
                    staged: Staged::Same,
                },
            );
        }
        s
    }

    #[test]
    fn longest_port_match_wins_within_an_identity() {
        let s = state_with(
            &[
                (key(300, Some(6), PortPrefix::ANY), Action::Allow),
                (key(300, Some(6), PortPrefix::exact(22)), Action::Deny),
            ],
            true,
        );
        let peer = Ipv4Addr::new(10, 0, 0, 2);
        let d = s
            .decide(EndpointId(1), Direction::Ingress, peer, 6, 22)
            .unwrap();
        assert_eq!(d.verdict, Verdict::DeniedByRule);
        let d = s
            .decide(EndpointId(1), Direction::Ingress, peer, 6, 80)
            .unwrap();
        assert_eq!(d.verdict, Verdict::Allowed);
        let d = s
            .decide(EndpointId(1), Direction::Ingress, peer, 17, 80)
            .unwrap();
        assert_eq!(d.verdict, Verdict::DeniedByDefault);
    }

    #[test]
    fn deny_for_any_identity_beats_allow_for_the_peer() {
        let s = state_with(
            &[
                (key(300, None, PortPrefix::ANY), Action::Allow),
                (key(0, Some(6), PortPrefix::exact(80)), Action::Deny),
            ],
            true,
        );
        let peer = Ipv4Addr::new(10, 0, 0, 2);
        let d = s
            .decide(EndpointId(1), Direction::Ingress, peer, 6, 80)
            .unwrap();
        assert_eq!(d.verdict, Verdict::DeniedByRule);
        assert_eq!(d.matched.unwrap().1.rule, RuleId(2));
    }

    #[test]
    fn unenforced_direction_allows_what_no_entry_matches() {
        let s = state_with(&[], false);
        let d = s
            .decide(
                EndpointId(1),
                Direction::Ingress,
                Ipv4Addr::new(192, 0, 2, 1),
                6,
                80,
            )
            .unwrap();
        assert_eq!(d.verdict, Verdict::Allowed);
        assert_eq!(d.peer.identity, Identity::WORLD);
    }

    #[test]
    fn diff_orders_additions_before_removals() {
        let a = state_with(&[(key(300, None, PortPrefix::ANY), Action::Allow)], true);
        let b = state_with(&[(key(301, None, PortPrefix::ANY), Action::Allow)], false);
        let d = diff(&a, &b);
        assert_eq!(d.policy_upserts.len(), 1);
        assert_eq!(d.policy_upserts[0].0.identity, Identity(301));
        assert_eq!(d.policy_removals, vec![key(300, None, PortPrefix::ANY)]);
        assert_eq!(d.endpoint_upserts.len(), 1);
        assert!(d.ipcache_upserts.is_empty() && d.ipcache_removals.is_empty());
        assert!(diff(&b, &b).is_empty());
    }

    #[test]
    fn applying_a_whole_diff_reaches_the_target_and_a_prefix_stops_part_way() {
        let a = state_with(&[(key(300, None, PortPrefix::ANY), Action::Allow)], true);
        let b = state_with(&[(key(301, None, PortPrefix::ANY), Action::Allow)], false);
        let d = diff(&a, &b);
        let mut full = a.clone();
        full.apply_prefix(&d, d.len());
        assert_eq!(full, b);
        let mut part = a.clone();
        part.apply_prefix(&d, 1);
        assert_eq!(part.policy.len(), 2);
        assert!(part.endpoints[&EndpointId(1)].ingress_enforced);
        // Rolling back from the partial state restores the original exactly.
        let back = diff(&part, &a);
        part.apply_prefix(&back, back.len());
        assert_eq!(part, a);
    }
}
