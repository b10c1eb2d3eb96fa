//! ipcache: longest-prefix match from an IP prefix to the identity behind it.

use crate::{assert_layout, user_pod};

/// LPM trie data. The kernel key is `{ prefix_len: u32, data: IpcacheKey }`; `prefix_len`
/// counts the 32 bits of `family` + padding, so an IPv4 /24 has `prefix_len = 32 + 24`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; an IPv4 address occupies the first 4 bytes.
    pub addr: [u8; 16],
}

/// Bits of the LPM key before the address starts.
pub const IPCACHE_PREFIX_OFFSET_BITS: u32 = 32;

impl IpcacheKey {
    pub const fn ipv4(addr: [u8; 4]) -> Self {
        Self {
            family: crate::family::IPV4,
            _pad: [0; 3],
            addr: [
                addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheValue {
    /// The identity of whatever owns this prefix.
    pub identity: u32,
    /// Local endpoint id when the prefix is a local endpoint's address, else 0.
    pub endpoint_id: u32,
    /// For endpoint addresses: the endpoint-scope alias of the most specific policy CIDR that
    /// contains the address (see `identity::CIDR_ENDPOINT_SCOPE`), or 0 when none does.
    pub cidr_identity: u32,
    pub flags: u32,
}

assert_layout!(IpcacheKey, size = 20, align = 1, { family: 0, addr: 4 });
assert_layout!(IpcacheValue, size = 16, align = 4, { identity: 0, endpoint_id: 4, cidr_identity: 8, flags: 12 });
user_pod!(IpcacheKey, IpcacheValue);
