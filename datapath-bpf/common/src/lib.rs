//! Every type that crosses the boundary between the BPF datapath and userspace.
//!
//! Rules for this crate (see shared/STYLE.md):
//! - `#[repr(C)]`, explicit `_pad` fields, integers only (no `bool`, `Option` or enums);
//! - fields in network byte order end in `_be`;
//! - sizes and offsets are asserted at compile time, so a layout change fails the build on both
//!   sides instead of corrupting maps at run time;
//! - a map whose layout changes gets a new version suffix in its name.
#![no_std]

pub mod config;
pub mod conntrack;
pub mod endpoint;
pub mod flow;
pub mod identity;
pub mod ipcache;
pub mod maps;
pub mod mark;
pub mod metrics;
pub mod policy;
pub mod prefilter;
pub mod proxy;
pub mod reason;

/// Address family tags stored in keys that carry an IP address.
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// IP protocol numbers the datapath understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
    pub const ICMPV6: u8 = 58;
}

/// Traffic direction, always relative to the endpoint the program is attached for.
pub mod direction {
    /// Traffic entering the endpoint (TC egress on the host-side veth).
    pub const INGRESS: u8 = 1;
    /// Traffic leaving the endpoint (TC ingress on the host-side veth).
    pub const EGRESS: u8 = 2;
}

/// Implements `aya::Pod` for userspace; the BPF side needs nothing.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: every type listed is `#[repr(C)]`, made only of integers and integer arrays,
            // with explicit padding, so any bit pattern is valid and there are no uninit bytes.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;

/// Compile-time layout check: size and field offsets, so both sides agree byte for byte.
macro_rules! assert_layout {
    ($t:ty, size = $size:expr, align = $align:expr, { $($field:ident : $off:expr),* $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$t>() == $size);
            assert!(core::mem::align_of::<$t>() == $align);
            $( assert!(core::mem::offset_of!($t, $field) == $off); )*
        };
    };
}
pub(crate) use assert_layout;
