//! Map names and capacities. The names are the ELF symbols in the BPF object and the file names
//! under the agent's bpffs directory, so they carry the layout version.

pub const IPCACHE: &str = "IPCACHE_V1";
pub const ENDPOINTS: &str = "ENDPOINTS_V1";
pub const POLICY: &str = "POLICY_V1";
pub const CONNTRACK: &str = "CT_V1";
pub const METRICS: &str = "METRICS_V1";
pub const FLOW_EVENTS: &str = "FLOW_EVENTS_V1";
pub const CONFIG: &str = "CONFIG_V1";
pub const EVENT_RATE: &str = "EVENT_RATE_V1";

pub const IPCACHE_MAX_ENTRIES: u32 = 65_536;
pub const ENDPOINTS_MAX_ENTRIES: u32 = 16_384;
pub const POLICY_MAX_ENTRIES: u32 = 1 << 20;
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const FLOW_EVENTS_BYTES: u32 = 4 << 20;
/// Slots in the per-endpoint event rate limiter (indexed by endpoint id modulo this).
pub const EVENT_RATE_SLOTS: u32 = 16_384;

/// Program (ELF section function) names.
pub const PROG_FROM_ENDPOINT: &str = "tc_from_endpoint";
pub const PROG_TO_ENDPOINT: &str = "tc_to_endpoint";
