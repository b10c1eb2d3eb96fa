//! `palisade-cni`: the CNI plugin that attaches containers a runtime creates to the palisade
//! agent (CNI spec 1.0.0 verbs ADD, DEL, CHECK, VERSION and 1.1.0's STATUS and GC; versions
//! 0.4.0 to 1.1.0). It is executed by the runtime: parameters in `CNI_*` variables, the network
//! configuration on stdin, the result (or the spec's error JSON) on stdout. See docs/cni.md.
#![expect(
    clippy::print_stdout,
    reason = "a CNI plugin's result is what it prints on stdout"
)]

mod config;
mod env;
mod error;
mod ipam;
mod result;
mod verbs;

use std::io::Read as _;

use config::{Config, SUPPORTED_VERSIONS};
use env::{CniEnv, Verb};
use error::{CniError, ErrorResult};

/// The version to answer in when the configuration could not tell one.
const FALLBACK_VERSION: &str = "1.1.0";

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .map_err(CniError::Stdin)?;
    Ok(raw)
}

/// The version a raw configuration asks for, if it says.
fn asked_version(raw: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(raw)
        .ok()?
        .get("cniVersion")?
        .as_str()
        .map(str::to_string)
}

/// Runs one invocation: what to print on stdout, or the error and the version to report it in.
async fn invoke(env: &CniEnv, raw: Vec<u8>) -> Result<Option<serde_json::Value>, CniError> {
    if env.verb == Verb::Version {
        let version = asked_version(&raw).unwrap_or_else(|| FALLBACK_VERSION.to_string());
        return Ok(Some(serde_json::json!({
            "cniVersion": version,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let config = Config::parse(raw)?;
    match env.verb {
        Verb::Add => verbs::add(env, &config).await.map(Some),
        Verb::Del => verbs::del(env, &config).await.map(|()| None),
        Verb::Check => verbs::check(env, &config).await.map(|()| None),
        Verb::Status => verbs::status(env, &config).await.map(|()| None),
        Verb::Gc => verbs::gc(env, &config).await.map(|()| None),
        Verb::Version => Ok(None),
    }
}

fn main() -> std::process::ExitCode {
    let raw = read_stdin();
    let version = raw
        .as_ref()
        .ok()
        .and_then(|r| asked_version(r))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_string());
    let outcome = raw.and_then(|raw| {
        let env = CniEnv::read(|k| std::env::var(k).ok())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CniError::Stdin)?;
        rt.block_on(invoke(&env, raw))
    });
    match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let body = ErrorResult {
                cni_version: &version,
                code: e.code(),
                msg: e.msg(),
                details: e.to_string(),
            };
            println!(
                "{}",
                serde_json::to_string(&body).unwrap_or_else(|_| e.to_string())
            );
            std::process::ExitCode::FAILURE
        }
    }
}
