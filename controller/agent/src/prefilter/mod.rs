//! The XDP prefilter: a CIDR deny list on the node's host-facing interfaces
//! (`--prefilter-device`), read from `--prefilter-file` at start and changed through the API
//! (`palisade prefilter add|delete|list`). See docs/prefilter.md.
//!
//! - `list`: the deny list as plain data and the map writes that reach it (pure, unit tested);
//! - `bpf`: the maps, the XDP program and its pinned links;
//! - `api`: the routes.
//!
//! The prefilter owns its maps (the engine never writes them). Maps and links are pinned, so
//! a stopped agent leaves the list enforcing, and a restarted one reconciles it (additions
//! first, removals last) without a moment when a listed CIDR passes. Entries added through the
//! API are saved in the state directory (`prefilter.txt`), so they survive even a lost bpffs.

pub mod api;
pub mod bpf;
pub mod list;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ipnetwork::Ipv4Network;
use palisade_api::prefilter::{PrefilterDeviceView, PrefilterEntryView, PrefilterView};
use tracing::info;

use self::bpf::{Attached, Loaded, Maps};
use self::list::{DenyList, ListError};

/// Why a prefilter request or start failed.
#[derive(Debug, thiserror::Error)]
pub enum PrefilterError {
    #[error(transparent)]
    List(#[from] ListError),
    #[error(transparent)]
    Bpf(Box<bpf::BpfError>),
    #[error("reading the prefilter file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("saving the prefilter list to {}: {source}", path.display())]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<bpf::BpfError> for PrefilterError {
    fn from(e: bpf::BpfError) -> Self {
        PrefilterError::Bpf(Box::new(e))
    }
}

/// What the agent was told about the prefilter.
#[derive(Clone, Debug, Default)]
pub struct PrefilterConfig {
    pub devices: Vec<String>,
    pub file: Option<PathBuf>,
}

/// The prefilter's state and its maps; one owner, behind [`Handle`].
pub struct Prefilter {
    list: DenyList,
    maps: Maps,
    saved: PathBuf,
    devices: Vec<Attached>,
    /// Keeps the loaded program while the agent runs.
    _loaded: Loaded,
}

/// Shared access to the prefilter for the API and metrics.
pub type Handle = Arc<Mutex<Prefilter>>;

/// The file the API's entries are saved in.
pub fn saved_list_path(state_dir: &Path) -> PathBuf {
    state_dir.join("prefilter.txt")
}

fn read_list(path: &Path) -> Result<Vec<Ipv4Network>, PrefilterError> {
    let text = std::fs::read_to_string(path).map_err(|source| PrefilterError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(list::parse_list(&text, path)?)
}

fn save(path: &Path, list: &DenyList) -> Result<(), PrefilterError> {
    let err = |source| PrefilterError::Save {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("txt.tmp");
    std::fs::write(&tmp, list::render_list(list.api_entries())).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

impl Prefilter {
    /// Loads the maps, reconciles them with the file and the saved API entries, then attaches
    /// the program to the devices. The list is in the maps before any device gets the program,
    /// and a device the previous agent attached keeps filtering throughout.
    pub fn start(
        cfg: &PrefilterConfig,
        bpffs: &Path,
        state_dir: &Path,
    ) -> Result<Self, PrefilterError> {
        let file = match &cfg.file {
            Some(p) => Some((p.clone(), read_list(p)?)),
            None => None,
        };
        let saved = saved_list_path(state_dir);
        let api = if saved.exists() {
            read_list(&saved)?
        } else {
            Vec::new()
        };
        let (mut loaded, mut maps) = Loaded::load(bpffs)?;
        let held = maps.held()?;
        let (list, plan) = DenyList::reconcile(
            &held,
            file.as_ref()
                .map(|(p, nets)| (p.as_path(), nets.as_slice())),
            &api,
            bpf::CAPACITY,
        )?;
        plan.apply(&mut maps)?;
        let devices = loaded.attach(&cfg.devices)?;
        info!(
            entries = list.entries().count(),
            added = plan.inserts.len(),
            removed = plan.removals.len(),
            devices = devices.len(),
            "prefilter ready"
        );
        Ok(Self {
            list,
            maps,
            saved,
            devices,
            _loaded: loaded,
        })
    }

    fn commit(&mut self, next: DenyList, plan: &list::Plan) -> Result<(), PrefilterError> {
        plan.apply(&mut self.maps)?;
        if let Err(e) = save(&self.saved, &next) {
            // Not saved: put the maps back as they were, so what holds matches what is saved.
            let undo = list::Plan {
                inserts: plan
                    .removals
                    .iter()
                    .filter_map(|n| {
                        self.list
                            .entries()
                            .find(|(m, _)| *m == n)
                            .map(|(m, e)| (*m, e.slot, false))
                    })
                    .collect(),
                removals: plan.inserts.iter().map(|(n, _, _)| *n).collect(),
            };
            let _ = undo.apply(&mut self.maps);
            return Err(e);
        }
        self.list = next;
        Ok(())
    }

    pub fn add(&mut self, nets: &[Ipv4Network]) -> Result<(), PrefilterError> {
        let (next, plan) = self.list.add(nets)?;
        self.commit(next, &plan)?;
        info!(cidrs = ?nets, "prefilter entries added");
        Ok(())
    }

    pub fn delete(&mut self, nets: &[Ipv4Network]) -> Result<(), PrefilterError> {
        let (next, plan) = self.list.delete(nets)?;
        self.commit(next, &plan)?;
        info!(cidrs = ?nets, "prefilter entries deleted");
        Ok(())
    }

    /// The devices, the entries and their counters.
    pub fn view(&self) -> Result<PrefilterView, PrefilterError> {
        let mut entries = Vec::new();
        for (net, e) in self.list.entries() {
            let (packets, bytes) = self.maps.counted(e.slot)?;
            let mut sources = Vec::new();
            if e.from_file {
                sources.push("file".to_string());
            }
            if e.from_api {
                sources.push("api".to_string());
            }
            entries.push(PrefilterEntryView {
                cidr: net.to_string(),
                sources,
                packets,
                bytes,
            });
        }
        Ok(PrefilterView {
            devices: self
                .devices
                .iter()
                .map(|d| PrefilterDeviceView {
                    name: d.name.clone(),
                    ifindex: d.ifindex,
                    mode: d.mode.name().to_string(),
                })
                .collect(),
            entries,
            capacity: self.list.capacity(),
        })
    }
}

/// The prefilter's lines of the Prometheus exposition: drops per CIDR and the attached
/// devices, in OpenMetrics text (without the final `# EOF`).
pub fn metrics_text(view: &PrefilterView) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    s.push_str("# HELP palisade_prefilter_dropped_packets Packets the XDP prefilter dropped, by denied CIDR.\n# TYPE palisade_prefilter_dropped_packets counter\n");
    for e in &view.entries {
        let _ = writeln!(
            s,
            "palisade_prefilter_dropped_packets_total{{cidr=\"{}\"}} {}",
            e.cidr, e.packets
        );
    }
    s.push_str("# HELP palisade_prefilter_dropped_bytes Bytes the XDP prefilter dropped, by denied CIDR.\n# TYPE palisade_prefilter_dropped_bytes counter\n");
    for e in &view.entries {
        let _ = writeln!(
            s,
            "palisade_prefilter_dropped_bytes_total{{cidr=\"{}\"}} {}",
            e.cidr, e.bytes
        );
    }
    s.push_str("# HELP palisade_prefilter_entries Entries in the XDP prefilter's deny list.\n# TYPE palisade_prefilter_entries gauge\n");
    let _ = writeln!(s, "palisade_prefilter_entries {}", view.entries.len());
    s.push_str("# HELP palisade_prefilter_device Interfaces the XDP prefilter is attached to, by mode.\n# TYPE palisade_prefilter_device gauge\n");
    for d in &view.devices {
        let _ = writeln!(
            s,
            "palisade_prefilter_device{{device=\"{}\",mode=\"{}\"}} 1",
            d.name, d.mode
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_each_cidr_and_device() {
        let view = PrefilterView {
            devices: vec![PrefilterDeviceView {
                name: "eth0".into(),
                ifindex: 2,
                mode: "generic".into(),
            }],
            entries: vec![PrefilterEntryView {
                cidr: "192.0.2.0/24".into(),
                sources: vec!["api".into()],
                packets: 7,
                bytes: 420,
            }],
            capacity: 16,
        };
        let text = metrics_text(&view);
        assert!(
            text.contains("palisade_prefilter_dropped_packets_total{cidr=\"192.0.2.0/24\"} 7\n")
        );
        assert!(
            text.contains("palisade_prefilter_dropped_bytes_total{cidr=\"192.0.2.0/24\"} 420\n")
        );
        assert!(text.contains("palisade_prefilter_device{device=\"eth0\",mode=\"generic\"} 1\n"));
        assert!(text.contains("palisade_prefilter_entries 1\n"));
    }
}
