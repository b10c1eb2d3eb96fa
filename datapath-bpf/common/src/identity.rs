//! Numeric security identities. Reserved numbers follow Cilium's numbering.

/// In a policy key: any peer identity.
pub const ANY: u32 = 0;
pub const HOST: u32 = 1;
pub const WORLD: u32 = 2;
pub const UNMANAGED: u32 = 3;
pub const HEALTH: u32 = 4;
pub const INIT: u32 = 5;
pub const REMOTE_NODE: u32 = 6;
pub const KUBE_APISERVER: u32 = 7;
pub const INGRESS: u32 = 8;

/// First identity allocated from labels.
pub const FIRST_LABEL_IDENTITY: u32 = 256;
/// Last identity allocated from labels (exclusive upper bound of the label scope).
pub const LABEL_IDENTITY_END: u32 = 1 << 24;
/// CIDR identities (one per prefix used by a policy) live in this scope, as in Cilium.
pub const CIDR_SCOPE: u32 = 1 << 24;
/// Endpoint-address aliases of CIDR identities: an endpoint whose address falls in a policy
/// CIDR is also looked up under `CIDR_ENDPOINT_SCOPE | n`, so ipBlock rules apply to endpoint
/// addresses without making entity rules such as `world` match endpoints.
pub const CIDR_ENDPOINT_SCOPE: u32 = 2 << 24;
/// Mask selecting the scope bits of an identity.
pub const SCOPE_MASK: u32 = 0xff << 24;
