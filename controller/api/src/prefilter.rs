//! The XDP prefilter's API shapes (`palisade prefilter ...`, docs/prefilter.md).
//!
//! - `GET /v1/prefilter` -> [`PrefilterView`];
//! - `POST /v1/prefilter` with [`PrefilterChange`] adds CIDRs -> [`PrefilterView`];
//! - `POST /v1/prefilter/delete` with [`PrefilterChange`] deletes them -> [`PrefilterView`].
//!
//! A change is all or nothing: one bad CIDR refuses the whole request.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefilterChange {
    pub cidrs: Vec<String>,
}

/// A host-facing interface the prefilter is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefilterDeviceView {
    pub name: String,
    pub ifindex: u32,
    /// `native` (XDP in the driver) or `generic` (XDP in the kernel's receive path, for
    /// drivers without it).
    pub mode: String,
}

/// One deny-list entry and what it dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefilterEntryView {
    pub cidr: String,
    /// Where it comes from: `file` (`--prefilter-file`), `api` (`palisade prefilter add`), or
    /// both.
    pub sources: Vec<String>,
    /// Packets and bytes dropped since the entry was added (kept across agent restarts).
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefilterView {
    pub devices: Vec<PrefilterDeviceView>,
    pub entries: Vec<PrefilterEntryView>,
    /// Entries the deny list can hold.
    pub capacity: u32,
}
