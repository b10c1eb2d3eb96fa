//! Palisade's datapath: two TC classifiers on every endpoint's host-side veth.
//!
//! `tc_from_endpoint` runs at TC ingress of the host-side veth and judges what the endpoint
//! sends (its egress); `tc_to_endpoint` runs at TC egress and judges what it receives (its
//! ingress). Both share one pipeline (`judge`): parse, conntrack, policy, account.
#![no_std]
#![no_main]

mod conntrack;
mod events;
mod judge;
mod maps;
mod packet;
mod policy;
mod proxy;

use aya_ebpf::{macros::classifier, programs::TcContext};
use palisade_common::direction;

#[classifier]
pub fn tc_from_endpoint(ctx: TcContext) -> i32 {
    judge::run(&ctx, direction::EGRESS)
}

#[classifier]
pub fn tc_to_endpoint(ctx: TcContext) -> i32 {
    judge::run(&ctx, direction::INGRESS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
