//! This node's CNI configuration, written by the agent once the Node object says its pod
//! CIDR (as Cilium's agent writes its own): palisade-cni standalone, host-local addresses from
//! that CIDR. The DaemonSet's init container only installs the plugin binary.

use std::io;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use serde_json::json;

/// The file name: sorted first, so runtimes pick it before any other network.
pub const FILE: &str = "05-palisade.conflist";

pub fn conflist(pod_cidr: Ipv4Network, api_socket: &Path, ipam_dir: &Path) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "palisade",
        "plugins": [{
            "type": "palisade-cni",
            "api": api_socket,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": pod_cidr.to_string() }]],
                "dataDir": ipam_dir,
            },
        }],
    })
}

/// Writes the configuration into `dir` through a temporary file and a rename, so a runtime
/// reading it at that moment reads the old file or the new one.
pub fn write(
    dir: &Path,
    pod_cidr: Ipv4Network,
    api_socket: &Path,
    ipam_dir: &Path,
) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(FILE);
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let text = serde_json::to_string_pretty(&conflist(pod_cidr, api_socket, ipam_dir))
        .map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_is_palisade_standalone_on_the_nodes_cidr() {
        let dir = std::env::temp_dir().join(format!("palisade-cniconf-{}", std::process::id()));
        let path = write(
            &dir,
            "10.2.0.0/24".parse().unwrap(),
            Path::new("/run/palisade/agent.sock"),
            Path::new("/var/lib/palisade/cni-ipam"),
        )
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "palisade-cni");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.2.0.0/24"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
