//! The prefilter's aya edge: its maps (pinned beside the datapath's), the XDP program and its
//! pinned links on the host-facing interfaces, native where the driver has XDP, generic
//! otherwise.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use ipnetwork::Ipv4Network;
use palisade_common::{
    endpoint::EndpointInfo,
    maps as names,
    metrics::MetricValue,
    prefilter::{
        PREFILTER_MAX_ENTRIES, PREFILTER_PREFIX_OFFSET_BITS, PrefilterKey, PrefilterValue,
    },
};
use tracing::{debug, info, warn};

use super::list::DenyMaps;

/// The BPF object the datapath embeds (built by build.rs from datapath-bpf).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade-datapath"));

/// What can fail at the prefilter's edge, naming the device, map or pin.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the BPF object for the prefilter: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the BPF object has no {what} {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("prefilter map {map}: {op}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("prefilter map {map} is full")]
    MapFull { map: &'static str },
    #[error("loading the prefilter XDP program: {0}")]
    Program(#[source] Box<ProgramError>),
    #[error("prefilter device {name:?}: no such interface in the agent's network namespace")]
    UnknownDevice { name: String },
    #[error(
        "prefilter device {name:?} is an endpoint's interface; name the node's host-facing interfaces (the endpoints' own programs judge theirs)"
    )]
    EndpointDevice { name: String },
    #[error("prefilter device {name:?} is the loopback interface")]
    Loopback { name: String },
    #[error("attaching the prefilter to {name}: native XDP: {native}; generic XDP: {generic}")]
    Attach {
        name: String,
        native: Box<ProgramError>,
        #[source]
        generic: Box<ProgramError>,
    },
    #[error("prefilter on {name}: link {}: {source}", pin.display())]
    Link {
        name: String,
        pin: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("prefilter on {name}: replacing the program behind {}: {source}", pin.display())]
    Replace {
        name: String,
        pin: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("prefilter on {name}: pinning {}: {source}", pin.display())]
    Pin {
        name: String,
        pin: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("prefilter links directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn map_err(map: &'static str, op: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| {
        if let MapError::SyscallError(e) = &source
            && matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        {
            return BpfError::MapFull { map };
        }
        BpfError::Map { map, op, source }
    }
}

/// How the XDP program runs on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the driver, before any socket buffer exists.
    Native,
    /// In the kernel's receive path (drivers without XDP).
    Generic,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub name: String,
    pub ifindex: u32,
    pub mode: Mode,
}

/// The deny list's maps.
pub struct Maps {
    trie: LpmTrie<MapData, PrefilterKey, PrefilterValue>,
    counters: PerCpuArray<MapData, MetricValue>,
    cpus: usize,
}

fn key(net: Ipv4Network) -> Key<PrefilterKey> {
    Key::new(
        PREFILTER_PREFIX_OFFSET_BITS + u32::from(net.prefix()),
        PrefilterKey::ipv4(net.network().octets()),
    )
}

impl Maps {
    /// The entries the datapath holds: (CIDR, counter slot). Entries this agent cannot read
    /// (another family) are skipped.
    pub fn held(&self) -> Result<Vec<(Ipv4Network, u32)>, BpfError> {
        let mut out = Vec::new();
        for item in &self.trie {
            let (k, v) = item.map_err(map_err(names::PREFILTER, "iterate"))?;
            let data = k.data();
            let Some(len) = k.prefix_len().checked_sub(PREFILTER_PREFIX_OFFSET_BITS) else {
                continue;
            };
            let addr =
                std::net::Ipv4Addr::new(data.addr[0], data.addr[1], data.addr[2], data.addr[3]);
            if data.family != palisade_common::family::IPV4 {
                continue;
            }
            if let Ok(net) = Ipv4Network::new(addr, u8::try_from(len).unwrap_or(u8::MAX)) {
                out.push((net, v.counter_slot));
            }
        }
        Ok(out)
    }

    /// Packets and bytes counted in `slot`, summed over CPUs.
    pub fn counted(&self, slot: u32) -> Result<(u64, u64), BpfError> {
        let values = self
            .counters
            .get(&slot, 0)
            .map_err(map_err(names::PREFILTER_COUNTERS, "read"))?;
        Ok(values
            .iter()
            .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes)))
    }
}

impl DenyMaps for Maps {
    type Error = BpfError;

    fn insert(&mut self, net: Ipv4Network, slot: u32, fresh: bool) -> Result<(), BpfError> {
        if fresh {
            let zero =
                PerCpuValues::try_from(vec![MetricValue::default(); self.cpus]).map_err(|e| {
                    BpfError::Map {
                        map: names::PREFILTER_COUNTERS,
                        op: "zero",
                        source: MapError::SyscallError(aya::sys::SyscallError {
                            call: "nr_cpus",
                            io_error: e,
                        }),
                    }
                })?;
            self.counters
                .set(slot, zero, 0)
                .map_err(map_err(names::PREFILTER_COUNTERS, "zero"))?;
        }
        let value = PrefilterValue {
            counter_slot: slot,
            flags: 0,
        };
        self.trie
            .insert(&key(net), value, 0)
            .map_err(map_err(names::PREFILTER, "insert"))
    }

    fn remove(&mut self, net: Ipv4Network) -> Result<(), BpfError> {
        match self.trie.remove(&key(net)) {
            Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
            Err(e) => Err(map_err(names::PREFILTER, "remove")(e)),
        }
    }
}

/// The loaded object: the maps, and the XDP program once a device needs it.
pub struct Loaded {
    bpf: Ebpf,
    links_dir: PathBuf,
    maps_dir: PathBuf,
}

impl Loaded {
    /// Loads the object against the pins under `bpffs` (the datapath has made them, or this
    /// makes the prefilter's), and returns the deny list's maps.
    pub fn load(bpffs: &Path) -> Result<(Self, Maps), BpfError> {
        let maps_dir = bpffs.join("maps");
        let links_dir = bpffs.join("prefilter-links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(|source| BpfError::Dir {
                path: d.clone(),
                source,
            })?;
        }
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)
            .map_err(BpfError::Load)?;
        let mut take = |name: &'static str| {
            bpf.take_map(name)
                .ok_or(BpfError::Missing { what: "map", name })
        };
        let trie = LpmTrie::try_from(take(names::PREFILTER)?)
            .map_err(map_err(names::PREFILTER, "open"))?;
        let counters = PerCpuArray::try_from(take(names::PREFILTER_COUNTERS)?)
            .map_err(map_err(names::PREFILTER_COUNTERS, "open"))?;
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1));
        Ok((
            Self {
                bpf,
                links_dir,
                maps_dir,
            },
            Maps {
                trie,
                counters,
                cpus,
            },
        ))
    }

    fn program(&mut self) -> Result<&mut Xdp, BpfError> {
        let name = names::PROG_PREFILTER;
        let prog: &mut Xdp = self
            .bpf
            .program_mut(name)
            .ok_or(BpfError::Missing {
                what: "program",
                name,
            })?
            .try_into()
            .map_err(|e| BpfError::Program(Box::new(e)))?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| BpfError::Program(Box::new(e)))?;
        }
        Ok(prog)
    }

    fn is_endpoint_interface(&self, ifindex: u32) -> bool {
        let Ok(data) = MapData::from_pin(self.maps_dir.join(names::ENDPOINTS)) else {
            return false;
        };
        let Ok(endpoints) =
            HashMap::<MapData, u32, EndpointInfo>::try_from(aya::maps::Map::HashMap(data))
        else {
            return false;
        };
        endpoints.get(&ifindex, 0).is_ok()
    }

    /// The interface index of a device the prefilter may be attached to.
    pub fn host_device(name: &str) -> Result<u32, BpfError> {
        let ifindex = nix::net::if_::if_nametoindex(name).map_err(|_| BpfError::UnknownDevice {
            name: name.to_string(),
        })?;
        if ifindex == 1 || name == "lo" {
            return Err(BpfError::Loopback {
                name: name.to_string(),
            });
        }
        Ok(ifindex)
    }

    /// Attaches the program to each device (through the pinned link a previous agent left,
    /// replacing its program atomically, or a new one), and detaches it from devices no
    /// longer named.
    pub fn attach(&mut self, devices: &[String]) -> Result<Vec<Attached>, BpfError> {
        let mut out = Vec::new();
        for name in devices {
            let ifindex = Self::host_device(name)?;
            if self.is_endpoint_interface(ifindex) {
                return Err(BpfError::EndpointDevice { name: name.clone() });
            }
            let mode = self.attach_one(name, ifindex)?;
            info!(device = %name, ifindex, mode = mode.name(), "prefilter attached");
            out.push(Attached {
                name: name.clone(),
                ifindex,
                mode,
            });
        }
        self.prune(&out);
        Ok(out)
    }

    fn pin(&self, name: &str, ifindex: u32, mode: Mode) -> PathBuf {
        self.links_dir
            .join(format!("{name}-{ifindex}-{}", mode.name()))
    }

    fn attach_one(&mut self, name: &str, ifindex: u32) -> Result<Mode, BpfError> {
        for mode in [Mode::Native, Mode::Generic] {
            let pin = self.pin(name, ifindex, mode);
            match PinnedLink::from_pin(&pin) {
                Ok(pinned) => {
                    let link_err = |source| BpfError::Link {
                        name: name.to_string(),
                        pin: pin.clone(),
                        source,
                    };
                    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
                    let prog = self.program()?;
                    let id = prog
                        .attach_to_link(link)
                        .map_err(|source| BpfError::Replace {
                            name: name.to_string(),
                            pin: pin.clone(),
                            source: Box::new(source),
                        })?;
                    // The pin keeps the link; the program must not detach it when dropped.
                    let link = prog
                        .take_link(id)
                        .map_err(|e| BpfError::Program(Box::new(e)))?;
                    drop(FdLink::try_from(link).map_err(link_err)?);
                    debug!(
                        device = name,
                        "prefilter program replaced in its pinned link"
                    );
                    return Ok(mode);
                }
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                }
                Err(source) => {
                    return Err(BpfError::Link {
                        name: name.to_string(),
                        pin,
                        source,
                    });
                }
            }
        }
        let links_dir = self.links_dir.clone();
        let prog = self.program()?;
        let (id, mode) = match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => (id, Mode::Native),
            Err(native) => match prog.attach_to_if_index(ifindex, XdpMode::Skb) {
                Ok(id) => (id, Mode::Generic),
                Err(generic) => {
                    return Err(BpfError::Attach {
                        name: name.to_string(),
                        native: Box::new(native),
                        generic: Box::new(generic),
                    });
                }
            },
        };
        let pin = links_dir.join(format!("{name}-{ifindex}-{}", mode.name()));
        let link_err = |source| BpfError::Link {
            name: name.to_string(),
            pin: pin.clone(),
            source,
        };
        let link = prog
            .take_link(id)
            .map_err(|e| BpfError::Program(Box::new(e)))?;
        let fd_link = FdLink::try_from(link).map_err(link_err)?;
        fd_link.pin(&pin).map_err(|source| BpfError::Pin {
            name: name.to_string(),
            pin: pin.clone(),
            source,
        })?;
        Ok(mode)
    }

    /// Removes the pinned links of devices no longer named (which detaches the program there).
    fn prune(&self, live: &[Attached]) {
        let Ok(dir) = fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in dir.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let keep = live
                .iter()
                .any(|a| file == format!("{}-{}-{}", a.name, a.ifindex, a.mode.name()));
            if !keep {
                info!(link = %file, "prefilter detached from a device no longer named");
                if let Err(e) = fs::remove_file(entry.path()) {
                    warn!(link = %file, error = %e, "cannot remove a prefilter link");
                }
            }
        }
    }
}

/// Entries the deny list holds: one counter slot each.
pub const CAPACITY: u32 = PREFILTER_MAX_ENTRIES;
