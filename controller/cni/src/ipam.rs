//! Delegating address management to the configuration's IPAM plugin, as the reference plugins
//! do: the plugin found in `CNI_PATH`, run with the same environment (but the verb) and the
//! whole configuration on stdin, its stderr passed through.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::env::{CniEnv, Verb};
use crate::error::CniError;
use crate::result::CniResult;

/// The plugin's executable in `CNI_PATH`.
pub fn find(env: &CniEnv, plugin: &str) -> Result<PathBuf, CniError> {
    env.path
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|p| is_executable(p))
        .ok_or_else(|| CniError::Ipam {
            plugin: plugin.to_string(),
            why: format!(
                "not found in CNI_PATH ({})",
                env.path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The configuration as the plugin can take it: a delegate may speak older versions than the
/// runtime (Debian's host-local stops at 1.0.0), so the version is lowered to the highest the
/// plugin supports that is not above the runtime's; every version's IPAM result reads alike.
fn for_delegate(env: &CniEnv, plugin: &str, config: &[u8]) -> Vec<u8> {
    let Ok(mut conf) = serde_json::from_slice::<serde_json::Value>(config) else {
        return config.to_vec();
    };
    let asked = conf["cniVersion"].as_str().unwrap_or_default().to_string();
    let supported = supported_versions(env, plugin);
    if supported.contains(&asked) || supported.is_empty() {
        return config.to_vec();
    }
    let ours = crate::config::SUPPORTED_VERSIONS;
    let Some(best) = ours
        .iter()
        .rev()
        .skip_while(|v| **v != asked)
        .find(|v| supported.iter().any(|s| s == *v))
    else {
        return config.to_vec();
    };
    conf["cniVersion"] = serde_json::Value::from(*best);
    serde_json::to_vec(&conf).unwrap_or_else(|_| config.to_vec())
}

/// The versions the plugin's VERSION reports (empty when it does not say). Asked up to three
/// times: on a loaded node a VERSION run has been seen to fail once and pass the next time, and
/// without its answer the configuration would go to the plugin in a version it refuses.
fn supported_versions(env: &CniEnv, plugin: &str) -> Vec<String> {
    (0..3)
        .find_map(|_| {
            run_raw(env, plugin, Verb::Version, br#"{"cniVersion":"1.0.0"}"#)
                .ok()
                .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out).ok())
                .and_then(|v| {
                    v["supportedVersions"].as_array().map(|vs| {
                        vs.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect::<Vec<_>>()
                    })
                })
        })
        .unwrap_or_default()
}

/// Runs the IPAM plugin for `verb`; its stdout on success.
pub fn run(env: &CniEnv, plugin: &str, verb: Verb, config: &[u8]) -> Result<Vec<u8>, CniError> {
    let config = for_delegate(env, plugin, config);
    run_raw(env, plugin, verb, &config)
}

fn run_raw(env: &CniEnv, plugin: &str, verb: Verb, config: &[u8]) -> Result<Vec<u8>, CniError> {
    let exe = find(env, plugin)?;
    let failed = |why: String| CniError::Ipam {
        plugin: plugin.to_string(),
        why,
    };
    let mut child = Command::new(&exe)
        .env("CNI_COMMAND", verb.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| failed(format!("cannot run {}: {e}", exe.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin may exit without reading its input (VERSION does): a broken pipe is not
        // its failure; its exit status and output say what happened.
        match stdin.write_all(config) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(failed(format!("writing its configuration: {e}")));
            }
            _ => {}
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("waiting for it: {e}")))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    // The plugin's own error result says why.
    let why = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .map_or_else(
            || String::from_utf8_lossy(&out.stdout).trim().to_string(),
            |v| {
                format!(
                    "{} (code {}){}",
                    v["msg"].as_str().unwrap_or("failed"),
                    v["code"],
                    v["details"]
                        .as_str()
                        .filter(|d| !d.is_empty())
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                )
            },
        );
    Err(failed(format!("{} failed: {why}", verb.as_str())))
}

/// ADD: the address the plugin allocated.
pub fn add(env: &CniEnv, plugin: &str, config: &[u8]) -> Result<CniResult, CniError> {
    let out = run(env, plugin, Verb::Add, config)?;
    serde_json::from_slice(&out).map_err(|e| CniError::Ipam {
        plugin: plugin.to_string(),
        why: format!("its ADD result is not a CNI result: {e}"),
    })
}

/// Whether the plugin speaks CNI 1.1.0 (STATUS and GC); plugins that do not are not asked.
pub fn speaks_1_1(env: &CniEnv, plugin: &str) -> bool {
    supported_versions(env, plugin).iter().any(|v| v == "1.1.0")
}
