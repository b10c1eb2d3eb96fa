//! Arbitrary bytes through everything that reads a client's request: the head parser, path
//! normalization and the chunked decoder. None may panic, and each keeps its promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_proxy::http::{
    ChunkEvent, ChunkedDecoder, Limits, normalize_path, parse_request_head, parse_response_head,
};

fuzz_target!(|data: &[u8]| {
    let small = Limits {
        max_head_bytes: 256,
        max_headers: 4,
        ..Limits::default()
    };
    for limits in [Limits::default(), small] {
        check_request_head(data, &limits);
        check_response_head(data, &limits);
        check_chunked(data, &limits);
    }
    if let Ok(raw) = std::str::from_utf8(data) {
        check_path(raw);
    }
});

fn check_request_head(data: &[u8], limits: &Limits) {
    let Ok(Some((head, len))) = parse_request_head(data, limits) else {
        return;
    };
    assert!(len <= data.len() && len <= limits.max_head_bytes);
    if head.path != "*" {
        assert_eq!(
            normalize_path(&head.path).as_ref(),
            Ok(&head.path),
            "path not stable"
        );
    }
    // A complete head parses the same with nothing after it.
    let again = parse_request_head(&data[..len], limits);
    assert!(matches!(again, Ok(Some((ref h, l))) if l == len && *h == head));
}

fn check_response_head(data: &[u8], limits: &Limits) {
    if let Ok(Some((_, len))) = parse_response_head(data, limits) {
        assert!(len <= data.len() && len <= limits.max_head_bytes);
    }
}

fn check_path(raw: &str) {
    let Ok(path) = normalize_path(raw) else {
        return;
    };
    assert!(path.starts_with('/'));
    assert!(!path.contains("//"), "{path:?}");
    assert!(
        !path
            .split('/')
            .any(|segment| segment == "." || segment == ".."),
        "{path:?}"
    );
    assert!(path.is_ascii());
    assert_eq!(
        normalize_path(&path).as_ref(),
        Ok(&path),
        "normalizing twice changed {raw:?}"
    );
}

/// What decoding a whole input amounts to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Complete { data: Vec<u8>, used: usize },
    Invalid,
    Starved,
}

/// The body decodes to the same result whether the input comes whole or in pieces.
fn check_chunked(data: &[u8], limits: &Limits) {
    let step = data.first().map_or(1, |&b| usize::from(b % 17) + 1);
    let whole = decode(data, data.len().max(1), limits);
    let pieces = decode(data, step, limits);
    assert_eq!(whole, pieces, "step {step}");
}

fn decode(input: &[u8], step: usize, limits: &Limits) -> Outcome {
    let mut decoder = ChunkedDecoder::new(limits);
    let mut data = Vec::new();
    let mut start = 0;
    let mut available = step.min(input.len());
    loop {
        let shown = &input[start..available];
        let event = match decoder.decode(shown) {
            Ok(event) => event,
            Err(_) => return Outcome::Invalid,
        };
        match event {
            ChunkEvent::Incomplete if available == input.len() => return Outcome::Starved,
            ChunkEvent::Incomplete => available = (available + step).min(input.len()),
            ChunkEvent::Data { len } => {
                assert!(len > 0 && len <= shown.len());
                data.extend_from_slice(&shown[..len]);
                start += len;
            }
            ChunkEvent::ChunkStart { consumed, .. }
            | ChunkEvent::ChunkEnd { consumed }
            | ChunkEvent::LastChunk { consumed } => {
                assert!(consumed > 0 && consumed <= shown.len());
                start += consumed;
            }
            ChunkEvent::End { consumed, .. } => {
                assert!(consumed > 0 && consumed <= shown.len());
                assert!(decoder.is_done());
                return Outcome::Complete {
                    data,
                    used: start + consumed,
                };
            }
        }
    }
}
