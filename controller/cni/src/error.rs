//! CNI errors: what failed, typed, and the code and JSON the spec gives it.

use serde::Serialize;

/// The spec's well-known error codes (and ours, from 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The container's interface name is taken in its namespace.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// The delegated IPAM plugin failed.
    pub const IPAM_FAILED: u32 = 102;
    /// The agent refused or failed the request.
    pub const AGENT_FAILED: u32 = 103;
    /// Netlink failed setting up or inspecting the attachment.
    pub const NETLINK_FAILED: u32 = 104;
    /// CHECK found the attachment incomplete.
    pub const CHECK_FAILED: u32 = 105;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI version {version:?} is not supported; supported: {supported}")]
    IncompatibleVersion { version: String, supported: String },
    #[error("unsupported field {field}={value} in the network configuration")]
    UnsupportedField { field: String, value: String },
    #[error("invalid environment variable {name}: {why}")]
    InvalidEnvironment { name: &'static str, why: String },
    #[error("reading the network configuration from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("network configuration is not valid JSON: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    #[error("the palisade agent is not available: {0}")]
    AgentDown(String),
    /// STATUS: the plugin cannot serve ADD now.
    #[error("palisade-cni cannot attach containers now: {0}")]
    NotAvailable(String),
    #[error("interface {ifname} already exists in {netns}")]
    InterfaceExists { ifname: String, netns: String },
    #[error("IPAM plugin {plugin}: {why}")]
    Ipam { plugin: String, why: String },
    #[error("the palisade agent refused the attachment: {0}")]
    Agent(String),
    #[error("{op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: palisade_netlink::NetlinkError,
    },
    #[error("{0}")]
    Check(String),
}

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            CniError::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            CniError::InvalidEnvironment { .. } => code::INVALID_ENVIRONMENT,
            CniError::Stdin(_) => code::IO_FAILURE,
            CniError::Decode(_) => code::DECODE_FAILURE,
            CniError::InvalidConfig(_) => code::INVALID_CONFIG,
            CniError::AgentDown(_) => code::TRY_AGAIN_LATER,
            CniError::NotAvailable(_) => code::NOT_AVAILABLE,
            CniError::InterfaceExists { .. } => code::INTERFACE_EXISTS,
            CniError::Ipam { .. } => code::IPAM_FAILED,
            CniError::Agent(_) => code::AGENT_FAILED,
            CniError::Netlink { .. } => code::NETLINK_FAILED,
            CniError::Check(_) => code::CHECK_FAILED,
        }
    }

    /// A short characterization, as the spec's `msg`.
    pub fn msg(&self) -> &'static str {
        match self {
            CniError::IncompatibleVersion { .. } => "Incompatible CNI version",
            CniError::UnsupportedField { .. } => "Unsupported field in network configuration",
            CniError::InvalidEnvironment { .. } => "Invalid necessary environment variables",
            CniError::Stdin(_) => "I/O failure",
            CniError::Decode(_) => "Failed to decode content",
            CniError::InvalidConfig(_) => "Invalid network config",
            CniError::AgentDown(_) => "palisade agent not available",
            CniError::NotAvailable(_) => "The plugin is not available",
            CniError::InterfaceExists { .. } => "Interface already exists",
            CniError::Ipam { .. } => "IPAM failed",
            CniError::Agent(_) => "palisade agent refused the attachment",
            CniError::Netlink { .. } => "Network setup failed",
            CniError::Check(_) => "Attachment is not as expected",
        }
    }
}

/// The error result the spec defines, on stdout.
#[derive(Debug, Serialize)]
pub struct ErrorResult<'a> {
    #[serde(rename = "cniVersion")]
    pub cni_version: &'a str,
    pub code: u32,
    pub msg: &'a str,
    pub details: String,
}
