//! The differential test's fixtures: a throwaway network namespace whose veth interfaces
//! stand in for endpoint interfaces, a throwaway bpffs, the real datapath loaded through
//! `BpfDatapath::load` and driven with BPF_PROG_TEST_RUN, and the runner that judges every
//! generated packet with both the real programs and `palisade_policies::datapath_model`.

pub mod frames;
pub mod run;
pub mod scenario;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
pub use palisade_agent::datapath::DatapathConfig;
use palisade_agent::datapath::{BpfDatapath, MapReader, monotonic_now_ns};
use palisade_common::config::{CONFIG_FLAG_FAST_PATH, Config};
use palisade_common::conntrack::{CtEntry as RawCtEntry, CtKey as RawCtKey};
use palisade_common::{direction, family, maps as names};
use palisade_engine::datapath::Datapath as _;
use palisade_policies::datapath_model::{CtEntry, CtKey, Outcome, Program};
use palisade_policies::endpoint::EndpointId;
use palisade_policies::identity::Identity;
use palisade_policies::mapstate::{self, MapState, RuleId};
use palisade_policies::model::Direction;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace of our own with `pairs` veth pairs (all ends in it, up), and a temp
/// directory for the bpffs; both removed in Drop. The kernel here has no dummy driver, so
/// veths provide the interfaces; nothing is routed anywhere and no packet is sent: the
/// programs only run under BPF_PROG_TEST_RUN.
pub struct DiffEnv {
    pub netns: String,
    /// Interface names; their ifindexes (looked up inside the namespace) serve as endpoints'.
    pub interfaces: Vec<String>,
    pub dir: PathBuf,
}

impl DiffEnv {
    pub fn create(test: &str, pairs: usize) -> DiffEnv {
        crate::require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("pd{}{n}", std::process::id() % 100_000);
        let env = DiffEnv {
            netns: format!("{tag}-{test}"),
            interfaces: (0..pairs * 2).map(|i| format!("e{i}")).collect(),
            dir: std::env::temp_dir().join(format!("palisade-diff-{tag}-{test}")),
        };
        let _ = std::fs::remove_dir_all(&env.dir);
        std::fs::create_dir_all(&env.dir).expect("temp dir");
        ip(&["netns", "add", &env.netns]).expect("netns");
        for pair in env.interfaces.chunks(2) {
            ip(&[
                "-n", &env.netns, "link", "add", &pair[0], "type", "veth", "peer", "name", &pair[1],
            ])
            .expect("veth pair");
        }
        for name in &env.interfaces {
            ip(&["-n", &env.netns, "link", "set", name, "up"]).expect("link up");
        }
        env
    }

    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }
}

impl Drop for DiffEnv {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = nix::mount::umount2(&self.bpffs(), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the real program did with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealOutcome {
    pub return_value: u32,
    pub mark: u32,
    pub counted: Vec<(u8, u64)>,
    /// The other direction's counters: the fast path's destination verdict.
    pub counted_other_direction: Vec<(u8, u64)>,
    pub frame_out: Vec<u8>,
}

impl RealOutcome {
    /// The outcome, when the run counted exactly one packet under a known outcome.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.counted.as_slice() {
            [(counter, 1)] => Outcome::from_counter(self.return_value, *counter),
            _ => None,
        }
    }
}

/// The real datapath: the loaded object, written through the `Datapath` trait as the engine
/// writes it, plus handles on the pinned conntrack and config maps for what a test must set
/// up that no packet can (a proxied connection, an uninitialized config).
pub struct RealDatapath {
    dp: BpfDatapath,
    reader: MapReader,
    _events: RingBuf<MapData>,
    conntrack: HashMap<MapData, RawCtKey, RawCtEntry>,
    config: Array<MapData, Config>,
    applied: MapState,
}

fn pinned(bpffs: &Path, name: &str) -> MapData {
    MapData::from_pin(bpffs.join("maps").join(name))
        .unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
}

fn scope_code(d: Direction) -> u8 {
    match d {
        Direction::Ingress => direction::INGRESS,
        Direction::Egress => direction::EGRESS,
    }
}

fn v4(a: Ipv4Addr) -> [u8; 16] {
    let o = a.octets();
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&o);
    out
}

impl RealDatapath {
    /// Loads the BPF object with its maps pinned under `bpffs` (mounted there by the loader).
    pub fn load(bpffs: &Path) -> RealDatapath {
        // Every packet counted, as the model has it; each case sets the fast path its way.
        Self::load_with(
            bpffs,
            DatapathConfig {
                conntrack_accounting: true,
                ..DatapathConfig::default()
            },
        )
    }

    /// `load` with other settings (the benchmarks compare them).
    pub fn load_with(bpffs: &Path, cfg: DatapathConfig) -> RealDatapath {
        let (dp, reader, events) =
            BpfDatapath::load(bpffs, cfg).unwrap_or_else(|e| panic!("loading the datapath: {e}"));
        let conntrack = HashMap::try_from(Map::LruHashMap(pinned(bpffs, names::CONNTRACK)))
            .expect("conntrack map");
        let config = Array::try_from(Map::Array(pinned(bpffs, names::CONFIG))).expect("config map");
        RealDatapath {
            dp,
            reader,
            _events: events,
            conntrack,
            config,
            applied: MapState::default(),
        }
    }

    /// Writes `desired` as the engine would (one diff from what the maps hold) and checks
    /// that the maps now read back as exactly `desired`.
    pub fn set_maps(&mut self, desired: &MapState) -> Result<(), String> {
        let diff = mapstate::diff(&self.applied, desired);
        self.dp
            .apply(&diff)
            .map_err(|e| format!("applying the map diff: {e}"))?;
        self.applied = desired.clone();
        let back = self
            .dp
            .read_state()
            .map_err(|e| format!("reading the maps back: {e}"))?;
        if back != *desired {
            return Err(format!(
                "the maps read back differ from what was written:\nwritten {desired:#?}\nread {back:#?}"
            ));
        }
        Ok(())
    }

    /// A policy change as the engine makes it: the next revision.
    pub fn bump_revision(&mut self) -> u32 {
        self.dp.bump_revision().expect("bump revision")
    }

    /// Switches the fast path between endpoints on or off (`CONFIG_FLAG_FAST_PATH`).
    pub fn set_fast_path(&mut self, on: bool) {
        let mut cfg = self.config.get(&0, 0).expect("config");
        if on {
            cfg.flags |= CONFIG_FLAG_FAST_PATH;
        } else {
            cfg.flags &= !CONFIG_FLAG_FAST_PATH;
        }
        self.config.set(0, cfg, 0).expect("config write");
    }

    /// Sets the config's `initialized` (0: the datapath must drop everything).
    pub fn set_initialized(&mut self, initialized: bool) {
        let mut cfg = self.config.get(&0, 0).expect("config");
        cfg.initialized = u32::from(initialized);
        self.config.set(0, cfg, 0).expect("config write");
    }

    /// Empties conntrack (entries of endpoints 1..=`endpoints` are all there can be) and
    /// checks that it is empty.
    pub fn flush_conntrack(&mut self, endpoints: u32) -> Result<(), String> {
        for id in 1..=endpoints {
            self.dp
                .flush_conntrack(EndpointId(id))
                .map_err(|e| format!("flushing conntrack: {e}"))?;
        }
        let left = self.conntrack()?;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("conntrack not empty after a flush: {left:?}"))
        }
    }

    /// Conntrack as the model holds it.
    pub fn conntrack(&self) -> Result<BTreeMap<CtKey, CtEntry>, String> {
        let raw = self
            .reader
            .conntrack()
            .map_err(|e| format!("reading conntrack: {e}"))?;
        raw.into_iter()
            .map(|(k, e)| {
                let scope = match k.scope {
                    direction::INGRESS => Direction::Ingress,
                    direction::EGRESS => Direction::Egress,
                    other => return Err(format!("conntrack key with scope {other}: {k:?}")),
                };
                if k.family != family::IPV4 {
                    return Err(format!("conntrack key with family {}: {k:?}", k.family));
                }
                let a = |b: &[u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                Ok((
                    CtKey {
                        scope,
                        protocol: k.protocol,
                        saddr: a(&k.saddr),
                        sport: u16::from_be(k.sport_be),
                        daddr: a(&k.daddr),
                        dport: u16::from_be(k.dport_be),
                    },
                    CtEntry {
                        endpoint: EndpointId(e.endpoint_id),
                        peer_identity: Identity(e.peer_identity),
                        rule: RuleId(e.rule_id),
                        policy_revision: e.policy_revision,
                        flags: e.flags,
                        proxy_port: u16::from_be(e.proxy_port_be),
                        packets: e.packets,
                        bytes: e.bytes,
                        proxy_client: a(&e.proxy_client),
                    },
                ))
            })
            .collect()
    }

    /// Writes a conntrack entry directly (alive for a minute).
    pub fn insert_conntrack(&mut self, key: &CtKey, e: &CtEntry) {
        let now = monotonic_now_ns();
        let raw_key = RawCtKey {
            saddr: v4(key.saddr),
            daddr: v4(key.daddr),
            sport_be: key.sport.to_be(),
            dport_be: key.dport.to_be(),
            protocol: key.protocol,
            family: family::IPV4,
            scope: scope_code(key.scope),
            _pad: 0,
        };
        let raw = RawCtEntry {
            expires_ns: now + 60_000_000_000,
            created_ns: now,
            packets: e.packets,
            bytes: e.bytes,
            endpoint_id: e.endpoint.0,
            peer_identity: e.peer_identity.0,
            rule_id: e.rule.0,
            policy_revision: e.policy_revision,
            flags: e.flags,
            proxy_port_be: e.proxy_port.to_be(),
            _pad: [0; 4],
            proxy_client: v4(e.proxy_client),
        };
        self.conntrack
            .insert(raw_key, raw, 0)
            .expect("conntrack insert");
    }

    /// Runs `program` `repeat` times on `frame` as arriving on `ifindex`: its return value
    /// and the kernel's mean time per run (for the benchmarks). Must be called from a thread
    /// inside the namespace that holds `ifindex`.
    pub fn time_run(
        &self,
        program: Program,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), String> {
        self.dp
            .time_run(program.name(), frame, ifindex, repeat)
            .map_err(|e| format!("timed test run: {e}"))
    }

    /// Runs `program` once on `frame` as arriving on `ifindex` with `mark` and `priority`.
    /// Must be called from a thread inside the namespace that holds `ifindex`.
    pub fn run(
        &self,
        program: Program,
        frame: &[u8],
        ifindex: u32,
        mark: u32,
        priority: u32,
    ) -> Result<RealOutcome, String> {
        let o = self
            .dp
            .test_run(program.name(), frame, ifindex, mark, priority)
            .map_err(|e| {
                let mut why = format!("test run of {} bytes: {e}", frame.len());
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    let _ = write!(why, ": {s}");
                    source = s.source();
                }
                why
            })?;
        Ok(RealOutcome {
            return_value: o.return_value,
            mark: o.mark,
            counted: o.counted,
            counted_other_direction: o.counted_other_direction,
            frame_out: o.frame_out,
        })
    }
}
