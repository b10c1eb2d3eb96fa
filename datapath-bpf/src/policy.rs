//! Policy lookup: the peer's identity, its CIDR alias (endpoint addresses inside policy
//! CIDRs) and the any-identity wildcard are each looked up in the LPM policy map; within one
//! identity the longest match already carries the right action (userspace guarantees it), and
//! across identities deny beats redirect beats allow. Entries also say what the policies in
//! audit would do (`flags::STAGED_DENY`): what the decision allows, they may deny.

use aya_ebpf::maps::lpm_trie::Key;
use palisade_common::{
    direction,
    endpoint::{
        EndpointInfo, FLAG_EGRESS_ENFORCED, FLAG_INGRESS_ENFORCED, FLAG_STAGED_EGRESS_ENFORCED,
        FLAG_STAGED_INGRESS_ENFORCED,
    },
    identity,
    policy::{POLICY_PREFIX_FULL, PolicyKey, PolicyValue, action, flags},
};

use crate::maps::POLICY;

/// The outcome of a policy check.
#[derive(Clone, Copy)]
pub struct Decision {
    /// `action::ALLOW`, `DENY`, `REDIRECT`, or 0 when no entry matched.
    pub action: u8,
    pub rule_id: u32,
    pub proxy_port_be: u16,
    /// The endpoint enforces policy in this direction.
    pub enforced: bool,
    /// `decide`: the policies in audit would deny what `action` (allow) lets through, by
    /// `staged_rule_id` (0: their default deny). `best_match`: an entry says so.
    pub staged_deny: bool,
    /// Some entry matched, of the policies in force or of those in audit.
    pub matched: bool,
    pub staged_rule_id: u32,
}

#[inline(always)]
fn lookup(endpoint_id: u32, peer: u32, dir: u8, protocol: u8, port_be: u16) -> Option<PolicyValue> {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey {
            endpoint_id,
            identity: peer,
            direction: dir,
            protocol,
            dport_be: port_be,
        },
    );
    POLICY.get(&key).copied()
}

#[inline(always)]
fn rank(action: u8) -> u8 {
    match action {
        action::DENY => 3,
        action::REDIRECT => 2,
        action::ALLOW => 1,
        _ => 0,
    }
}

#[inline(always)]
fn merge(best: &mut Decision, found: Option<PolicyValue>) {
    let Some(v) = found else { return };
    best.matched = true;
    if !best.staged_deny && v.flags & flags::STAGED_DENY != 0 {
        best.staged_deny = true;
        best.staged_rule_id = v.rule_id;
    }
    if rank(v.action) > rank(best.action) {
        best.action = v.action;
        best.rule_id = v.rule_id;
        best.proxy_port_be = v.proxy_port_be;
    }
}

/// The highest-precedence entry across the peer's identity, its CIDR alias and the
/// wildcard, without any default (`action` 0 when nothing matched).
#[inline(always)]
pub fn best_match(
    endpoint_id: u32,
    dir: u8,
    peer_identity: u32,
    peer_cidr_identity: u32,
    protocol: u8,
    port_be: u16,
) -> Decision {
    let mut best = Decision {
        action: action::NONE,
        rule_id: 0,
        proxy_port_be: 0,
        enforced: false,
        staged_deny: false,
        matched: false,
        staged_rule_id: 0,
    };
    merge(
        &mut best,
        lookup(endpoint_id, peer_identity, dir, protocol, port_be),
    );
    merge(
        &mut best,
        lookup(endpoint_id, identity::ANY, dir, protocol, port_be),
    );
    if peer_cidr_identity != 0 {
        merge(
            &mut best,
            lookup(endpoint_id, peer_cidr_identity, dir, protocol, port_be),
        );
    }
    best
}

/// The verdict for `ep` in `dir`: the best match, or, when nothing matched, allow unless the
/// endpoint enforces that direction. For an allow, also whether the policies in audit would
/// deny it: an entry's staged deny, or, when no entry matched at all, their default deny.
#[inline(always)]
pub fn decide(
    ep: &EndpointInfo,
    dir: u8,
    peer_identity: u32,
    peer_cidr_identity: u32,
    protocol: u8,
    port_be: u16,
) -> Decision {
    let enforced_flag = if dir == direction::INGRESS {
        FLAG_INGRESS_ENFORCED
    } else {
        FLAG_EGRESS_ENFORCED
    };
    // Deny rules and L7 redirects can apply even where no allow-policy selects the endpoint,
    // so the map is consulted in both cases; only the default differs.
    let mut best = best_match(
        ep.endpoint_id,
        dir,
        peer_identity,
        peer_cidr_identity,
        protocol,
        port_be,
    );
    best.enforced = ep.flags & enforced_flag != 0;
    if best.action == action::NONE && !best.enforced {
        best.action = action::ALLOW;
    }
    let staged_flag = if dir == direction::INGRESS {
        FLAG_STAGED_INGRESS_ENFORCED
    } else {
        FLAG_STAGED_EGRESS_ENFORCED
    };
    if best.action != action::ALLOW {
        best.staged_deny = false;
    } else if !best.matched && ep.flags & staged_flag != 0 {
        best.staged_deny = true;
        best.staged_rule_id = 0;
    }
    best
}
