//! `cargo xtask install-cni`: palisade-cni where runtimes look for plugins, and the example
//! network configuration where they look for networks. The DaemonSet's init container installs
//! the same two files.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::{build_binaries, workspace_root};

/// The example network: palisade-cni standalone, host-local addresses from 10.201.0.0/16.
pub const CONFLIST: &str = "controller/cni/conf/50-palisade.conflist";
/// The delegated plugins the example uses (`ctr` finds plugins only in the bin directory).
const DELEGATES: [&str; 2] = ["host-local", "loopback"];
/// Debian's containernetworking-plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

pub struct Target {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// Replace a conflist that is already there.
    pub force: bool,
}

/// Copies `from` to `to` through a temporary file and a rename, so a runtime executing the
/// plugin at that moment sees the old file or the new one, never half of one.
fn replace(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("palisade-new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming into {}", to.display()))
}

pub fn run(target: &Target) -> anyhow::Result<()> {
    let bins = build_binaries(true)?;
    for dir in [&target.bin_dir, &target.conf_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let plugin = target.bin_dir.join("palisade-cni");
    replace(&bins.join("palisade-cni"), &plugin)?;
    println!("installed {}", plugin.display());
    for delegate in DELEGATES {
        let at = target.bin_dir.join(delegate);
        let reference = Path::new(REFERENCE_PLUGINS).join(delegate);
        if at.exists() {
            continue;
        }
        if !reference.exists() {
            bail!(
                "{} is missing and so is {} (Debian package containernetworking-plugins; `cargo xtask install` installs it)",
                at.display(),
                reference.display()
            );
        }
        std::os::unix::fs::symlink(&reference, &at)
            .with_context(|| format!("linking {} to {}", at.display(), reference.display()))?;
        println!("linked {} -> {}", at.display(), reference.display());
    }
    let conf = target.conf_dir.join("50-palisade.conflist");
    if conf.exists() && !target.force {
        println!(
            "kept {} (it is there already; --force replaces it)",
            conf.display()
        );
    } else {
        replace(&workspace_root().join(CONFLIST), &conf)?;
        println!("installed {}", conf.display());
    }
    println!(
        "containers on network \"palisade\" (podman run --network palisade ..., ctr run --cni ...) are attached to the agent at /run/palisade/agent.sock"
    );
    Ok(())
}
