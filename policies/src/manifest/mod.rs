//! Manifest parsing (being written).
