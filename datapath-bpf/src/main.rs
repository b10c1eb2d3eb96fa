//! Palisade's datapath: two TC classifiers on every endpoint's host-side veth.
//!
//! `tc_from_endpoint` runs at TC ingress of the host-side veth and judges what the endpoint
//! sends (its egress); `tc_to_endpoint` runs at TC egress and judges what it receives (its
//! ingress). Both share one pipeline (`judge`): parse, conntrack, policy, account. Between two
//! endpoints of the node, `tc_from_endpoint` runs the destination's ingress verdict too and
//! delivers the packet itself (`fast_path`).
//! `sk_lookup_proxy` runs in the node namespace's listener lookups and answers only those for
//! a SYN `tc_from_endpoint` handed to the proxy's TIME_WAIT socket (`proxy`).
//! `xdp_prefilter` runs on the node's host-facing interfaces: the CIDR deny list (`prefilter`).
#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "BPF: what is inlined decides the stack frames and what the verifier walks, so it \
              is chosen here, not left to the optimizer"
)]

mod conntrack;
mod events;
mod fast_path;
mod judge;
mod maps;
mod packet;
mod policy;
mod prefilter;
mod proxy;

use palisade_common::direction;

palisade_common::bpf_classifier!(PROG_FROM_ENDPOINT, |ctx| judge::run(
    &ctx,
    direction::EGRESS
));

palisade_common::bpf_classifier!(PROG_TO_ENDPOINT, |ctx| judge::run(&ctx, direction::INGRESS));

palisade_common::bpf_xdp!(PROG_PREFILTER, |ctx| prefilter::run(&ctx));

palisade_common::bpf_sk_lookup!(PROG_PROXY_LOOKUP, |ctx| proxy::listener_for_time_wait_syn(
    &ctx
));

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
