//! The datapath's maps. Names must match `palisade_common::maps`; all are pinned by name so a
//! restarted agent picks up the same state and enforcement never lapses.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use palisade_common::{
    config::{Config, EventRateState},
    conntrack::{CtEntry, CtKey},
    endpoint::EndpointInfo,
    ipcache::{IpcacheKey, IpcacheValue},
    maps as names,
    metrics::{METRICS_MAX_ENTRIES, MetricValue},
    policy::{PolicyKey, PolicyValue},
};

#[map(name = "IPCACHE_V1")]
pub static IPCACHE: LpmTrie<IpcacheKey, IpcacheValue> =
    LpmTrie::pinned(names::IPCACHE_MAX_ENTRIES, 0);

#[map(name = "ENDPOINTS_V1")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(names::ENDPOINTS_MAX_ENTRIES, 0);

#[map(name = "POLICY_V1")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(names::POLICY_MAX_ENTRIES, 0);

#[map(name = "CT_V1")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> =
    LruHashMap::pinned(names::CONNTRACK_MAX_ENTRIES, 0);

#[map(name = "METRICS_V1")]
pub static METRICS: PerCpuArray<MetricValue> = PerCpuArray::pinned(METRICS_MAX_ENTRIES, 0);

#[map(name = "FLOW_EVENTS_V1")]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(names::FLOW_EVENTS_BYTES, 0);

#[map(name = "EVENT_RATE_V1")]
pub static EVENT_RATE: PerCpuArray<EventRateState> =
    PerCpuArray::pinned(names::EVENT_RATE_SLOTS, 0);

#[map(name = "CONFIG_V1")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);
