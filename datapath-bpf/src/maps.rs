//! The datapath's maps, declared under the names of `palisade_common::maps` (the one table of
//! names); all are pinned by name so a restarted agent picks up the same state and enforcement
//! never lapses.

use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash};
use palisade_common::{
    config::{Config, EventRateState},
    conntrack::{CtEntry, CtKey},
    endpoint::EndpointInfo,
    ipcache::{IpcacheKey, IpcacheValue},
    maps as names,
    metrics::{METRICS_MAX_ENTRIES, MetricValue},
    policy::{PolicyKey, PolicyValue},
    proxy::{
        PROXY_LISTENERS_MAX_ENTRIES, TIME_WAIT_SYNS_MAX_ENTRIES, TimeWaitSynKey, TimeWaitSynValue,
    },
};

palisade_common::bpf_map!(
    IPCACHE,
    pub static IPCACHE: LpmTrie<IpcacheKey, IpcacheValue> =
        LpmTrie::pinned(names::IPCACHE_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    ENDPOINTS,
    pub static ENDPOINTS: HashMap<u32, EndpointInfo> =
        HashMap::pinned(names::ENDPOINTS_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    ENDPOINT_BY_ADDR,
    pub static ENDPOINT_BY_ADDR: HashMap<[u8; 16], u32> =
        HashMap::pinned(names::ENDPOINT_BY_ADDR_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    POLICY,
    pub static POLICY: LpmTrie<PolicyKey, PolicyValue> =
        LpmTrie::pinned(names::POLICY_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    CONNTRACK,
    pub static CONNTRACK: LruHashMap<CtKey, CtEntry> =
        LruHashMap::pinned(names::CONNTRACK_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    METRICS,
    pub static METRICS: PerCpuArray<MetricValue> = PerCpuArray::pinned(METRICS_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    FLOW_EVENTS,
    pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(names::FLOW_EVENTS_BYTES, 0);
);

palisade_common::bpf_map!(
    EVENT_RATE,
    pub static EVENT_RATE: PerCpuArray<EventRateState> =
        PerCpuArray::pinned(names::EVENT_RATE_SLOTS, 0);
);

palisade_common::bpf_map!(
    CONFIG,
    pub static CONFIG: Array<Config> = Array::pinned(1, 0);
);

palisade_common::bpf_map!(
    TIME_WAIT_SYNS,
    pub static TIME_WAIT_SYNS: LruHashMap<TimeWaitSynKey, TimeWaitSynValue> =
        LruHashMap::with_max_entries(TIME_WAIT_SYNS_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    PROXY_LISTENERS,
    pub static PROXY_LISTENERS: SockHash<u32> =
        SockHash::with_max_entries(PROXY_LISTENERS_MAX_ENTRIES, 0);
);
