//! The real datapath: loads the embedded BPF object with its maps pinned under the agent's
//! bpffs directory, attaches the classifiers to endpoint veths through pinned TCX links, and
//! writes map diffs. Pinning maps and links means a restarted agent takes over the same state
//! and replaces programs atomically; enforcement never lapses while the agent is down.

pub mod convert;
pub mod events;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf, SockHash, lpm_trie::Key,
    },
    pin::PinError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, SkLookup, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use palisade_common::{
    config::Config,
    conntrack::{CtEntry, CtKey},
    endpoint::EndpointInfo,
    ipcache::{IpcacheKey, IpcacheValue},
    maps as names,
    metrics::{METRICS_MAX_ENTRIES, MetricValue},
    policy::{PolicyKey as RawPolicyKey, PolicyValue},
};
use palisade_engine::datapath::{
    ApplyError, Datapath, DatapathError, EndpointHealth, TrackedConnection,
};
use palisade_policies::{
    endpoint::EndpointId,
    mapstate::{MapDiff, MapState},
};
use tracing::{debug, info, warn};

/// What can fail in the aya datapath, with the map, program or interface it failed on.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Mounting needs CAP_SYS_ADMIN in the agent's mount namespace.
    #[error(
        "cannot mount bpffs at {path}: {source} (the agent needs CAP_SYS_ADMIN to mount it, or mount it first: mount -t bpf bpf {path})"
    )]
    BpffsMount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the BPF object failed: {0}")]
    Load(#[source] EbpfError),
    #[error("the BPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("the BPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("BPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    /// The verifier refused a program; `log_tail` is the end of its log, which says why.
    #[error("BPF program {name}: {source}: {log_tail}")]
    Verifier {
        name: &'static str,
        #[source]
        source: ProgramError,
        log_tail: String,
    },
    #[error("attaching to {ifname}: {source}")]
    Attach {
        ifname: String,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to {ifname}: link {pin}: {source}")]
    Link {
        ifname: String,
        pin: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("attaching to {ifname}: pin {pin}: {source}")]
    Pin {
        ifname: String,
        pin: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("attaching {name} to the node namespace: {source}")]
    AttachNetns {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("map {map} is full")]
    MapFull { map: &'static str },
    #[error("map {map}: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading map state back: {0}")]
    Decode(#[from] convert::DecodeError),
}

impl From<BpfError> for DatapathError {
    fn from(e: BpfError) -> Self {
        DatapathError::new(e)
    }
}

/// One non-zero datapath counter, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSample {
    /// 0 for datapath-wide counters, else `palisade_common::direction`.
    pub direction: u8,
    /// `palisade_common::metrics::OUTCOME_*` or a drop reason.
    pub outcome: u8,
    pub packets: u64,
    pub bytes: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// The BPF object built by build.rs from datapath-bpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade-datapath"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the kernel's BPF filesystem is conventionally mounted.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

fn is_bpffs(dir: &Path) -> Result<bool, nix::Error> {
    let st = nix::sys::statfs::statfs(dir)?;
    Ok(st.filesystem_type().0 == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> Result<(), BpfError> {
    nix::mount::mount(
        Some("bpf"),
        at,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| BpfError::BpffsMount {
        path: at.to_path_buf(),
        source: e.into(),
    })?;
    info!(path = %at.display(), "mounted bpffs");
    Ok(())
}

/// Makes `dir` a directory on a bpffs. Under /sys/fs/bpf, the filesystem is mounted there
/// when it is not (as Cilium does), and `dir` is made inside it; anywhere else, `dir` itself
/// becomes a bpffs mount unless it already is one.
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let bpffs_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| BpfError::Bpffs { path, source }
    };
    let sys = Path::new(SYS_FS_BPF);
    if dir.starts_with(sys) {
        if !sys.is_dir() {
            return Err(bpffs_err(sys)(io::Error::new(
                io::ErrorKind::NotFound,
                "no /sys/fs/bpf directory (is sysfs mounted?)",
            )));
        }
        if !is_bpffs(sys).map_err(|e| bpffs_err(sys)(e.into()))? {
            mount_bpffs(sys)?;
        }
        fs::create_dir_all(dir).map_err(bpffs_err(dir))?;
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(bpffs_err(dir))?;
    if !is_bpffs(dir).map_err(|e| bpffs_err(dir)(e.into()))? {
        mount_bpffs(dir)?;
    }
    Ok(())
}

fn map_err(map: &'static str, op: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| {
        // A full map is a capacity problem the operator must see named as such.
        if let MapError::SyscallError(e) = &source
            && matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        {
            return BpfError::MapFull { map };
        }
        BpfError::Map { map, op, source }
    }
}

pub struct BpfDatapath {
    bpf: Ebpf,
    links_dir: PathBuf,
    policy: LpmTrie<MapData, RawPolicyKey, PolicyValue>,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// An endpoint's address -> its host-side ifindex, for the fast path; kept beside
    /// `endpoints` by `apply`.
    endpoint_by_addr: HashMap<MapData, [u8; 16], u32>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    config: Array<MapData, Config>,
}

/// Datapath tunables the agent writes into the config map.
#[derive(Clone, Copy, Debug)]
pub struct DatapathConfig {
    pub ct_tcp_syn_timeout_s: u32,
    pub ct_tcp_established_timeout_s: u32,
    pub ct_tcp_close_timeout_s: u32,
    pub ct_other_timeout_s: u32,
    pub events_per_second: u32,
    pub events_burst: u32,
    /// Deliver between local endpoints in BPF (`CONFIG_FLAG_FAST_PATH`).
    pub fast_path: bool,
    /// Count every packet and byte in conntrack entries (`CONFIG_FLAG_CT_ACCOUNTING`).
    pub conntrack_accounting: bool,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        // Cilium's defaults: 6h established TCP, 60s SYN and non-TCP, 10s after close.
        Self {
            ct_tcp_syn_timeout_s: 60,
            ct_tcp_established_timeout_s: 21_600,
            ct_tcp_close_timeout_s: 10,
            ct_other_timeout_s: 60,
            events_per_second: 1_000,
            events_burst: 2_000,
            fast_path: true,
            conntrack_accounting: false,
        }
    }
}

fn config_flags(cfg: DatapathConfig) -> u32 {
    let mut flags = 0;
    if cfg.fast_path {
        flags |= palisade_common::config::CONFIG_FLAG_FAST_PATH;
    }
    if cfg.conntrack_accounting {
        flags |= palisade_common::config::CONFIG_FLAG_CT_ACCOUNTING;
    }
    flags
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
    bpf.take_map(name).ok_or(BpfError::MissingMap { name })
}

impl BpfDatapath {
    /// Lets a client reconnect at once from a port whose last connection is still in TIME_WAIT
    /// at the proxy (see `palisade_common::proxy`): loads the sk_lookup program, gives it the
    /// proxy's TCP `listeners` (port, socket) and attaches it to the agent's own network
    /// namespace, the node's, for as long as the agent runs. Without it such a SYN is dropped
    /// and the client connects on its retransmission; nothing else changes.
    pub fn steer_time_wait_syns(
        &mut self,
        listeners: &[(u16, std::os::fd::BorrowedFd<'_>)],
    ) -> Result<(), BpfError> {
        let name = names::PROG_PROXY_LOOKUP;
        let map = names::PROXY_LISTENERS;
        let mut sockets: SockHash<&mut MapData, u32> = SockHash::try_from(
            self.bpf
                .map_mut(map)
                .ok_or(BpfError::MissingMap { name: map })?,
        )
        .map_err(map_err(map, "open"))?;
        for (port, socket) in listeners {
            use std::os::fd::AsRawFd as _;
            sockets
                .insert(u32::from(*port), socket.as_raw_fd(), 0)
                .map_err(map_err(map, "insert"))?;
        }
        let prog: &mut SkLookup = self
            .bpf
            .program_mut(name)
            .ok_or(BpfError::MissingProgram { name })?
            .try_into()
            .map_err(|source| BpfError::Program { name, source })?;
        prog.load().map_err(|source| BpfError::Verifier {
            name,
            log_tail: verifier_log(&source),
            source,
        })?;
        let netns = fs::File::open("/proc/self/ns/net")
            .map_err(|source| BpfError::AttachNetns { name, source })?;
        prog.attach(&netns)
            .map_err(|source| BpfError::Program { name, source })?;
        Ok(())
    }

    /// Loads the object, reusing maps already pinned under `bpffs` (agent restart). Returns
    /// the datapath, a reader for the maps others may read without the engine, and the
    /// flow-event ring buffer for the event reader.
    pub fn load(
        bpffs: &Path,
        cfg: DatapathConfig,
    ) -> Result<(Self, MapReader, RingBuf<MapData>), BpfError> {
        ensure_bpffs(bpffs)?;
        let maps_dir = bpffs.join("maps");
        let links_dir = bpffs.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(|source| BpfError::Bpffs {
                path: d.clone(),
                source,
            })?;
        }
        let mut bpf = EbpfLoader::new()
            // The programs use no CO-RE relocations: skip parsing the kernel's BTF at start.
            .btf(None)
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)
            .map_err(BpfError::Load)?;
        for name in [names::PROG_FROM_ENDPOINT, names::PROG_TO_ENDPOINT] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or(BpfError::MissingProgram { name })?
                .try_into()
                .map_err(|source| BpfError::Program { name, source })?;
            prog.load().map_err(|source| BpfError::Verifier {
                name,
                log_tail: verifier_log(&source),
                source,
            })?;
        }
        let policy = LpmTrie::try_from(take_map(&mut bpf, names::POLICY)?)
            .map_err(map_err(names::POLICY, "open"))?;
        let ipcache = LpmTrie::try_from(take_map(&mut bpf, names::IPCACHE)?)
            .map_err(map_err(names::IPCACHE, "open"))?;
        let endpoints = HashMap::try_from(take_map(&mut bpf, names::ENDPOINTS)?)
            .map_err(map_err(names::ENDPOINTS, "open"))?;
        let endpoint_by_addr = HashMap::try_from(take_map(&mut bpf, names::ENDPOINT_BY_ADDR)?)
            .map_err(map_err(names::ENDPOINT_BY_ADDR, "open"))?;
        let conntrack = HashMap::try_from(take_map(&mut bpf, names::CONNTRACK)?)
            .map_err(map_err(names::CONNTRACK, "open"))?;
        let reader = MapReader::open(&maps_dir)?;
        let mut config: Array<MapData, Config> =
            Array::try_from(take_map(&mut bpf, names::CONFIG)?)
                .map_err(map_err(names::CONFIG, "open"))?;
        let events = RingBuf::try_from(take_map(&mut bpf, names::FLOW_EVENTS)?)
            .map_err(map_err(names::FLOW_EVENTS, "open"))?;

        // Keep counting revisions from where a previous agent left off, so conntrack entries
        // validated under its revisions are re-checked once against ours.
        let previous = config.get(&0, 0).map_err(map_err(names::CONFIG, "read"))?;
        let next = Config {
            policy_revision: previous.policy_revision.wrapping_add(1),
            initialized: 1,
            ct_tcp_syn_timeout_s: cfg.ct_tcp_syn_timeout_s,
            ct_tcp_established_timeout_s: cfg.ct_tcp_established_timeout_s,
            ct_tcp_close_timeout_s: cfg.ct_tcp_close_timeout_s,
            ct_other_timeout_s: cfg.ct_other_timeout_s,
            events_per_second: cfg.events_per_second,
            events_burst: cfg.events_burst,
            flags: config_flags(cfg),
        };
        config
            .set(0, next, 0)
            .map_err(map_err(names::CONFIG, "write"))?;
        info!(
            bpffs = %bpffs.display(),
            revision = next.policy_revision,
            restarted = previous.initialized != 0,
            "datapath loaded"
        );
        let mut dp = Self {
            bpf,
            links_dir,
            policy,
            ipcache,
            endpoints,
            endpoint_by_addr,
            conntrack,
            config,
        };
        dp.rebuild_endpoint_addresses()?;
        Ok((dp, reader, events))
    }

    /// Makes the address map say exactly what the endpoint map does: after a restart the
    /// engine finds the endpoints already written and writes neither again (and an agent
    /// from before the address map left it empty).
    fn rebuild_endpoint_addresses(&mut self) -> Result<(), BpfError> {
        let want: std::collections::BTreeMap<[u8; 16], u32> = self
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, e)| (e.addr, ifindex))
            .collect();
        let stale: Vec<[u8; 16]> = self
            .endpoint_by_addr
            .iter()
            .filter_map(Result::ok)
            .filter(|(addr, ifindex)| want.get(addr) != Some(ifindex))
            .map(|(addr, _)| addr)
            .collect();
        for addr in stale {
            self.remove_endpoint_address(&addr, None)?;
        }
        for (addr, ifindex) in want {
            self.endpoint_by_addr
                .insert(addr, ifindex, 0)
                .map_err(map_err(names::ENDPOINT_BY_ADDR, "insert"))?;
        }
        Ok(())
    }

    /// Removes `addr` from the address map, when it still names `ifindex` (any, with None).
    fn remove_endpoint_address(
        &mut self,
        addr: &[u8; 16],
        ifindex: Option<u32>,
    ) -> Result<(), BpfError> {
        if let Some(ifindex) = ifindex
            && self.endpoint_by_addr.get(addr, 0).ok() != Some(ifindex)
        {
            return Ok(());
        }
        match self.endpoint_by_addr.remove(addr) {
            Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
            Err(err) => Err(map_err(names::ENDPOINT_BY_ADDR, "remove")(err)),
        }
    }

    fn link_pin(&self, ifname: &str, ifindex: u32, attach: &str) -> PathBuf {
        // The ifindex is part of the name: a re-created interface with the same name must get
        // a fresh attachment, never a stale pinned link that no longer filters anything.
        self.links_dir.join(format!("{ifname}-{ifindex}-{attach}"))
    }

    fn attach_one(
        &mut self,
        prog_name: &'static str,
        ifname: &str,
        pin: &Path,
        attach_type: TcAttachType,
    ) -> Result<(), BpfError> {
        let attach_err = |source: ProgramError| BpfError::Attach {
            ifname: ifname.to_string(),
            source,
        };
        let link_err = |source: LinkError| BpfError::Link {
            ifname: ifname.to_string(),
            pin: pin.to_path_buf(),
            source,
        };
        let prog: &mut SchedClassifier = self
            .bpf
            .program_mut(prog_name)
            .ok_or(BpfError::MissingProgram { name: prog_name })?
            .try_into()
            .map_err(attach_err)?;
        let link_id = match PinnedLink::from_pin(pin) {
            // Already attached by us (or a previous agent): swap the program in atomically.
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
                prog.attach_to_link(link).map_err(attach_err)?
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => prog
                .attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_err)?,
            Err(e) => return Err(link_err(e)),
        };
        let link = prog.take_link(link_id).map_err(attach_err)?;
        let fd_link: FdLink = link.try_into().map_err(link_err)?;
        match fd_link.pin(pin) {
            Ok(pinned) => drop(pinned),
            // attach_to_link on an existing pin: the pin is already there.
            Err(PinError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::AlreadyExists => {
            }
            Err(source) => {
                return Err(BpfError::Pin {
                    ifname: ifname.to_string(),
                    pin: pin.to_path_buf(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Removes pinned links whose interface is gone (deleted while the agent was down).
    fn prune_stale_links(&self, live: &[(String, u32)]) {
        let Ok(dir) = fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = live
                .iter()
                .any(|(ifname, ifindex)| name.starts_with(&format!("{ifname}-{ifindex}-")));
            if !keep {
                debug!(link = %name, "removing stale pinned link");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

fn verifier_log(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { verifier_log, .. } => {
            let log = verifier_log.to_string();
            // The tail says why the verifier refused.
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
        _ => String::new(),
    }
}

impl Datapath for BpfDatapath {
    fn apply(&mut self, diff: &MapDiff) -> Result<(), ApplyError> {
        let mut applied = 0usize;
        let fail = |applied: usize| {
            move |source: BpfError| ApplyError {
                applied,
                source: source.into(),
            }
        };
        for (k, v) in &diff.policy_upserts {
            let (prefix, raw) = convert::policy_key(k);
            self.policy
                .insert(&Key::new(prefix, raw), convert::policy_value(*v), 0)
                .map_err(map_err(names::POLICY, "insert"))
                .map_err(fail(applied))?;
            applied += 1;
        }
        for (net, v) in &diff.ipcache_upserts {
            let (prefix, raw) = convert::ipcache_key(*net);
            self.ipcache
                .insert(&Key::new(prefix, raw), convert::ipcache_value(v), 0)
                .map_err(map_err(names::IPCACHE, "insert"))
                .map_err(fail(applied))?;
            applied += 1;
        }
        for (id, e) in &diff.endpoint_upserts {
            let info = convert::endpoint_info(*id, e);
            let previous = self.endpoints.get(&e.ifindex, 0).ok();
            self.endpoints
                .insert(e.ifindex, info, 0)
                .map_err(map_err(names::ENDPOINTS, "insert"))
                .map_err(fail(applied))?;
            // The endpoint first, then the address that leads to it (the datapath checks the
            // one against the other either way).
            if let Some(old) = previous
                && old.addr != info.addr
            {
                self.remove_endpoint_address(&old.addr, Some(e.ifindex))
                    .map_err(fail(applied))?;
            }
            self.endpoint_by_addr
                .insert(info.addr, e.ifindex, 0)
                .map_err(map_err(names::ENDPOINT_BY_ADDR, "insert"))
                .map_err(fail(applied))?;
            applied += 1;
        }
        for (id, e) in &diff.endpoint_removals {
            let addr = convert::endpoint_info(*id, e).addr;
            self.remove_endpoint_address(&addr, Some(e.ifindex))
                .map_err(fail(applied))?;
            match self.endpoints.remove(&e.ifindex) {
                Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
                Err(err) => return Err(fail(applied)(map_err(names::ENDPOINTS, "remove")(err))),
            }
            applied += 1;
        }
        for net in &diff.ipcache_removals {
            let (prefix, raw) = convert::ipcache_key(*net);
            match self.ipcache.remove(&Key::new(prefix, raw)) {
                Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
                Err(err) => return Err(fail(applied)(map_err(names::IPCACHE, "remove")(err))),
            }
            applied += 1;
        }
        for k in &diff.policy_removals {
            let (prefix, raw) = convert::policy_key(k);
            match self.policy.remove(&Key::new(prefix, raw)) {
                Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
                Err(err) => return Err(fail(applied)(map_err(names::POLICY, "remove")(err))),
            }
            applied += 1;
        }
        Ok(())
    }

    fn read_state(&self) -> Result<MapState, DatapathError> {
        Ok(self.read_maps()?)
    }

    fn bump_revision(&mut self) -> Result<u32, DatapathError> {
        Ok(self.next_revision()?)
    }

    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        Ok(self.attach_both(ifname, ifindex)?)
    }

    fn detach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        for attach in ["ingress", "egress"] {
            let pin = self.link_pin(ifname, ifindex, attach);
            match fs::remove_file(&pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(pin = %pin.display(), error = %e, "cannot remove pinned link"),
            }
        }
        Ok(())
    }

    fn flush_conntrack(&mut self, endpoint: EndpointId) -> Result<usize, DatapathError> {
        let keys: Vec<CtKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.endpoint_id == endpoint.0)
            .map(|(k, _)| k)
            .collect();
        for k in &keys {
            let _ = self.conntrack.remove(k);
        }
        Ok(keys.len())
    }

    fn gc_conntrack(&mut self) -> Result<(usize, usize), DatapathError> {
        Ok(self.sweep_conntrack()?)
    }

    fn prune_links(&mut self, live: &[(String, u32)]) {
        self.prune_stale_links(live);
    }

    fn endpoint_health(
        &self,
        endpoint: EndpointId,
        ifname: &str,
        ifindex: u32,
    ) -> Result<EndpointHealth, DatapathError> {
        let interface_present = nix::net::if_::if_nametoindex(ifname).is_ok_and(|i| i == ifindex);
        let programs_attached = ["ingress", "egress"]
            .iter()
            .all(|attach| self.link_pin(ifname, ifindex, attach).exists());
        let in_datapath = match self.endpoints.get(&ifindex, 0) {
            Ok(info) => info.endpoint_id == endpoint.0,
            Err(MapError::KeyNotFound) => false,
            Err(e) => return Err(map_err(names::ENDPOINTS, "read")(e).into()),
        };
        Ok(EndpointHealth {
            interface_present,
            programs_attached,
            in_datapath,
        })
    }

    fn connections(&self) -> Result<Vec<TrackedConnection>, DatapathError> {
        let mut out = Vec::new();
        for item in &self.conntrack {
            let (k, v) = item.map_err(map_err(names::CONNTRACK, "iterate"))?;
            if let Some(c) = convert::tracked_connection(&k, &v) {
                out.push(c);
            }
        }
        Ok(out)
    }
}

impl BpfDatapath {
    fn read_maps(&self) -> Result<MapState, BpfError> {
        let mut state = MapState::default();
        for item in &self.policy {
            let (k, v) = item.map_err(map_err(names::POLICY, "iterate"))?;
            let key = convert::policy_key_from(k.prefix_len(), &k.data())?;
            state.policy.insert(key, convert::policy_entry_from(v)?);
        }
        for item in &self.ipcache {
            let (k, v) = item.map_err(map_err(names::IPCACHE, "iterate"))?;
            let net = convert::ipcache_key_from(k.prefix_len(), &k.data())?;
            state.ipcache.insert(net, convert::ipcache_entry_from(&v));
        }
        for item in &self.endpoints {
            let (ifindex, v) = item.map_err(map_err(names::ENDPOINTS, "iterate"))?;
            let (id, e) = convert::endpoint_entry_from(ifindex, &v);
            state.endpoints.insert(id, e);
        }
        Ok(state)
    }

    fn next_revision(&mut self) -> Result<u32, BpfError> {
        let mut cfg = self
            .config
            .get(&0, 0)
            .map_err(map_err(names::CONFIG, "read"))?;
        cfg.policy_revision = cfg.policy_revision.wrapping_add(1);
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::CONFIG, "write"))?;
        Ok(cfg.policy_revision)
    }

    fn attach_both(&mut self, ifname: &str, ifindex: u32) -> Result<(), BpfError> {
        let ingress = self.link_pin(ifname, ifindex, "ingress");
        let egress = self.link_pin(ifname, ifindex, "egress");
        self.attach_one(
            names::PROG_FROM_ENDPOINT,
            ifname,
            &ingress,
            TcAttachType::Ingress,
        )?;
        self.attach_one(
            names::PROG_TO_ENDPOINT,
            ifname,
            &egress,
            TcAttachType::Egress,
        )?;
        debug!(ifname, ifindex, "classifiers attached");
        Ok(())
    }

    fn sweep_conntrack(&mut self) -> Result<(usize, usize), BpfError> {
        let now = monotonic_now_ns();
        let mut live = 0;
        let mut dead = Vec::new();
        for item in &self.conntrack {
            let (k, v) = item.map_err(map_err(names::CONNTRACK, "iterate"))?;
            if v.expires_ns < now {
                dead.push(k);
            } else {
                live += 1;
            }
        }
        for k in &dead {
            let _ = self.conntrack.remove(k);
        }
        Ok((dead.len(), live))
    }
}

/// Read-only handles on the maps that the API, metrics and status read without the engine:
/// conntrack and counters, opened from their pins, so a slow dump never stalls the engine.
pub struct MapReader {
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    metrics: PerCpuArray<MapData, MetricValue>,
}

impl MapReader {
    fn open(maps_dir: &Path) -> Result<Self, BpfError> {
        let pinned = |name: &'static str| {
            MapData::from_pin(maps_dir.join(name)).map_err(map_err(name, "open pinned"))
        };
        let conntrack = HashMap::try_from(aya::maps::Map::LruHashMap(pinned(names::CONNTRACK)?))
            .map_err(map_err(names::CONNTRACK, "open"))?;
        let metrics = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(pinned(names::METRICS)?))
            .map_err(map_err(names::METRICS, "open"))?;
        Ok(Self { conntrack, metrics })
    }

    /// Every conntrack entry, as the datapath holds it.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>, BpfError> {
        self.conntrack
            .iter()
            .map(|item| item.map_err(map_err(names::CONNTRACK, "iterate")))
            .collect()
    }

    /// How many conntrack entries there are (without copying them out).
    pub fn conntrack_count(&self) -> usize {
        self.conntrack.keys().flatten().count()
    }

    /// The non-zero counters.
    pub fn counters(&self) -> Result<Vec<CounterSample>, BpfError> {
        let mut out = Vec::new();
        for index in 0..METRICS_MAX_ENTRIES {
            let values = self
                .metrics
                .get(&index, 0)
                .map_err(map_err(names::METRICS, "read"))?;
            let (packets, bytes) = values
                .iter()
                .fold((0u64, 0u64), |(p, b), v| (p + v.packets, b + v.bytes));
            if packets > 0 {
                out.push(CounterSample {
                    direction: u8::try_from(index / 256).unwrap_or(u8::MAX),
                    outcome: u8::try_from(index % 256).unwrap_or(u8::MAX),
                    packets,
                    bytes,
                });
            }
        }
        Ok(out)
    }
}

/// What one `BpfDatapath::test_run` of a classifier did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return value: `TC_ACT_OK` (0), `TC_ACT_SHOT` (2), or the fast path's
    /// `TC_ACT_REDIRECT` (7).
    pub return_value: u32,
    /// The skb mark after the run (the program sets `mark::TO_PROXY` on a redirect).
    pub mark: u32,
    /// The counters of the program's direction this run incremented: (outcome, packets),
    /// outcome being `metrics::OUTCOME_*` or a drop reason. One entry for one packet.
    pub counted: Vec<(u8, u64)>,
    /// The same for the other direction: the fast path's destination ingress verdict,
    /// given by the sender's program.
    pub counted_other_direction: Vec<(u8, u64)>,
    /// The frame as the program left it.
    pub frame_out: Vec<u8>,
}

/// `struct __sk_buff` as BPF_PROG_TEST_RUN takes it for a SCHED_CLS program (uapi
/// linux/bpf.h): 192 bytes, of which the test sets `mark`, `priority` and `ifindex`.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_MARK: usize = 8;
const SK_BUFF_PRIORITY: usize = 32;
const SK_BUFF_IFINDEX: usize = 40;

impl BpfDatapath {
    /// The loaded classifier `program`, for test runs.
    fn classifier(&self, program: &'static str) -> Result<&SchedClassifier, BpfError> {
        self.bpf
            .program(program)
            .ok_or(BpfError::MissingProgram { name: program })?
            .try_into()
            .map_err(|source| BpfError::Program {
                name: program,
                source,
            })
    }

    /// Runs one classifier `repeat` times on `frame` as `test_run` does (mark and priority 0)
    /// and returns its last return value and the kernel's mean time per run: the program's
    /// own cost per packet, for the benchmarks.
    pub fn time_run(
        &self,
        program: &'static str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), BpfError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let prog = self.classifier(program)?;
        let mut ctx_in = [0u8; SK_BUFF_SIZE];
        ctx_in[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx_in),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|source| BpfError::Program {
                name: program,
                source,
            })?;
        Ok((result.return_value, result.duration))
    }

    /// Runs one classifier (`names::PROG_FROM_ENDPOINT` or `PROG_TO_ENDPOINT`) once with
    /// BPF_PROG_TEST_RUN on `frame` (Ethernet header onwards, at least 14 bytes) as if it
    /// arrived on `ifindex` with skb mark `mark` and priority `priority`, against the live
    /// maps. For tests (the differential test of the datapath against
    /// `palisade_policies::datapath_model`): the kernel resolves `ifindex` in the calling
    /// thread's network namespace.
    pub fn test_run(
        &self,
        program: &'static str,
        frame: &[u8],
        ifindex: u32,
        mark: u32,
        priority: u32,
    ) -> Result<TestRunOutcome, BpfError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        use palisade_common::{
            direction,
            metrics::{OUTCOME_AUDIT, OUTCOME_FORWARDED, OUTCOME_REDIRECTED, metric_index},
            reason::ALL_DROP_REASONS,
        };

        let dir = if program == names::PROG_FROM_ENDPOINT {
            direction::EGRESS
        } else {
            direction::INGRESS
        };
        let metrics: PerCpuArray<&MapData, MetricValue> =
            PerCpuArray::try_from(self.bpf.map(names::METRICS).ok_or(BpfError::MissingMap {
                name: names::METRICS,
            })?)
            .map_err(map_err(names::METRICS, "open"))?;
        let outcomes: Vec<u8> = [OUTCOME_FORWARDED, OUTCOME_REDIRECTED, OUTCOME_AUDIT]
            .into_iter()
            .chain(ALL_DROP_REASONS.iter().copied().filter(|r| *r != 0))
            .collect();
        let other = if dir == direction::EGRESS {
            direction::INGRESS
        } else {
            direction::EGRESS
        };
        let read = |dir: u8| -> Result<Vec<u64>, BpfError> {
            outcomes
                .iter()
                .map(|o| {
                    let values = metrics
                        .get(&metric_index(dir, *o), 0)
                        .map_err(map_err(names::METRICS, "read"))?;
                    Ok(values.iter().map(|v| v.packets).sum())
                })
                .collect()
        };
        let prog = self.classifier(program)?;
        let mut ctx_in = [0u8; SK_BUFF_SIZE];
        ctx_in[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx_in[SK_BUFF_PRIORITY..SK_BUFF_PRIORITY + 4].copy_from_slice(&priority.to_ne_bytes());
        ctx_in[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let mut ctx_out = [0u8; SK_BUFF_SIZE];
        // The programs never grow a frame; the margin is for the kernel's own checks.
        let mut data_out = vec![0u8; frame.len() + 64];
        let (before, before_other) = (read(dir)?, read(other)?);
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data_out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .map_err(|source| BpfError::Program {
                name: program,
                source,
            })?;
        let (after, after_other) = (read(dir)?, read(other)?);
        let changed = |before: &[u64], after: &[u64]| -> Vec<(u8, u64)> {
            outcomes
                .iter()
                .zip(before.iter().zip(after))
                .filter(|(_, (b, a))| a != b)
                .map(|(o, (b, a))| (*o, a.wrapping_sub(*b)))
                .collect()
        };
        let counted = changed(&before, &after);
        let counted_other_direction = changed(&before_other, &after_other);
        data_out.truncate(usize::try_from(result.data_size_out).unwrap_or(0));
        let mut out_mark = [0u8; 4];
        out_mark.copy_from_slice(&ctx_out[SK_BUFF_MARK..SK_BUFF_MARK + 4]);
        Ok(TestRunOutcome {
            return_value: result.return_value,
            mark: u32::from_ne_bytes(out_mark),
            counted,
            counted_other_direction,
            frame_out: data_out,
        })
    }
}
