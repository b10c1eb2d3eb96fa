//! Arbitrary bytes as the JSON body of every agent API request, as the server reads them
//! (`serde_json::from_slice`). None may panic; what parses serializes and parses back to the
//! same value (the CLI's `-o json` and the docs rely on the shapes being one); a flow query's
//! filter is prepared and matched against fixed flows (see `check_filter`).
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use palisade_api::types::{
    EndpointAddRequest, FlowQuery, LabelChange, PolicyApplyRequest, TraceRequest,
};
use palisade_api_fuzz::check_filter;
use serde::Serialize;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    round_trip::<EndpointAddRequest>(data);
    round_trip::<LabelChange>(data);
    round_trip::<PolicyApplyRequest>(data);
    round_trip::<TraceRequest>(data);
    if let Some(query) = round_trip::<FlowQuery>(data) {
        check_filter(&query.filter);
    }
});

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&value).expect("what parsed serializes");
    let back: T = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "{value:?} serialized as {} does not parse back: {e}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(back, value, "JSON round trip");
    Some(value)
}
