//! The chunked transfer coding (RFC 9112 §7.1), decoded incrementally so bodies stream: the
//! decoder only says where chunk data and framing lie in the bytes it is shown; the caller
//! forwards the data and writes framing of its own.

use super::Limits;
use super::fields::Field;

/// Longest chunk-size line accepted, extensions included; extensions are dropped anyway.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Why a chunked body was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("invalid chunk-size line")]
    InvalidSize,
    #[error("chunk-size line longer than {limit} bytes")]
    SizeLineTooLong { limit: usize },
    #[error("control byte {byte:#04x} in a chunk-size line")]
    ControlInSizeLine { byte: u8 },
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("malformed trailer section: {0}")]
    InvalidTrailers(httparse::Error),
    #[error("trailer section ends a line with a bare LF")]
    BareLfInTrailers,
    #[error("trailer section larger than {limit} bytes")]
    TrailersTooLarge { limit: usize },
    #[error("more than {limit} trailer fields")]
    TooManyTrailers { limit: usize },
    #[error("input after the end of the chunked body")]
    AfterEnd,
}

/// What the start of the bytes shown to [`ChunkedDecoder::decode`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkEvent {
    /// Not enough bytes to decide; nothing consumed. Show these bytes again with more after.
    Incomplete,
    /// A chunk-size line (`consumed` bytes) opening a chunk of `size` > 0 bytes.
    ChunkStart { consumed: usize, size: u64 },
    /// The first `len` bytes are chunk data.
    Data { len: usize },
    /// The CRLF (`consumed` bytes) closing a chunk's data.
    ChunkEnd { consumed: usize },
    /// The `0` line (`consumed` bytes): trailers and the end follow.
    LastChunk { consumed: usize },
    /// The trailer section and final CRLF (`consumed` bytes): the body is complete.
    End {
        consumed: usize,
        trailers: Vec<Field>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SizeLine,
    Data { remaining: u64 },
    DataCrlf,
    Trailers,
    Done,
}

/// Incremental decoder of one chunked body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    max_trailer_bytes: usize,
    max_trailers: usize,
}

impl ChunkedDecoder {
    /// Trailers are held to the same limits as a head.
    pub fn new(limits: &Limits) -> Self {
        ChunkedDecoder {
            state: State::SizeLine,
            max_trailer_bytes: limits.max_head_bytes,
            max_trailers: limits.max_headers,
        }
    }

    /// Whether the final CRLF has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads the next element at the start of `buf`; the caller drops the bytes consumed (or
    /// `len` data bytes) before the next call.
    pub fn decode(&mut self, buf: &[u8]) -> Result<ChunkEvent, ChunkedError> {
        match self.state {
            State::SizeLine => self.size_line(buf),
            State::Data { remaining } => Ok(self.data(buf, remaining)),
            State::DataCrlf => self.data_crlf(buf),
            State::Trailers => self.trailers(buf),
            State::Done => Err(ChunkedError::AfterEnd),
        }
    }

    fn size_line(&mut self, buf: &[u8]) -> Result<ChunkEvent, ChunkedError> {
        // httparse takes an empty or blank line for size 0; a size needs a digit.
        if buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
            return Err(ChunkedError::InvalidSize);
        }
        let (consumed, size) = match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete(parsed)) => parsed,
            Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                return Err(ChunkedError::SizeLineTooLong {
                    limit: MAX_CHUNK_LINE,
                });
            }
            Ok(httparse::Status::Partial) => return Ok(ChunkEvent::Incomplete),
            Err(httparse::InvalidChunkSize) => return Err(ChunkedError::InvalidSize),
        };
        if consumed > MAX_CHUNK_LINE {
            return Err(ChunkedError::SizeLineTooLong {
                limit: MAX_CHUNK_LINE,
            });
        }
        // httparse lets any byte through in extensions, a bare LF included; a peer that ends
        // the line there would see different framing.
        let line = &buf[..consumed.saturating_sub(2)];
        if let Some(&byte) = line
            .iter()
            .find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(ChunkedError::ControlInSizeLine { byte });
        }
        if size == 0 {
            self.state = State::Trailers;
            return Ok(ChunkEvent::LastChunk { consumed });
        }
        self.state = State::Data { remaining: size };
        Ok(ChunkEvent::ChunkStart { consumed, size })
    }

    fn data(&mut self, buf: &[u8], remaining: u64) -> ChunkEvent {
        if buf.is_empty() {
            return ChunkEvent::Incomplete;
        }
        let len = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        // `len` <= `remaining`, so this cannot underflow.
        let left = remaining - len as u64;
        self.state = if left == 0 {
            State::DataCrlf
        } else {
            State::Data { remaining: left }
        };
        ChunkEvent::Data { len }
    }

    fn data_crlf(&mut self, buf: &[u8]) -> Result<ChunkEvent, ChunkedError> {
        match buf {
            [] | [b'\r'] => Ok(ChunkEvent::Incomplete),
            [b'\r', b'\n', ..] => {
                self.state = State::SizeLine;
                Ok(ChunkEvent::ChunkEnd { consumed: 2 })
            }
            _ => Err(ChunkedError::MissingCrlf),
        }
    }

    fn trailers(&mut self, buf: &[u8]) -> Result<ChunkEvent, ChunkedError> {
        match buf {
            [] | [b'\r'] => return Ok(ChunkEvent::Incomplete),
            [b'\r', b'\n', ..] => {
                self.state = State::Done;
                return Ok(ChunkEvent::End {
                    consumed: 2,
                    trailers: Vec::new(),
                });
            }
            _ => {}
        }
        let mut slots = [httparse::EMPTY_HEADER; super::MAX_HEADERS_CAP];
        let slots = &mut slots[..self.max_trailers.min(super::MAX_HEADERS_CAP)];
        let (consumed, fields) = match httparse::parse_headers(buf, slots) {
            Ok(httparse::Status::Complete((consumed, fields))) => (consumed, fields),
            Ok(httparse::Status::Partial) if buf.len() >= self.max_trailer_bytes => {
                return Err(ChunkedError::TrailersTooLarge {
                    limit: self.max_trailer_bytes,
                });
            }
            Ok(httparse::Status::Partial) => return Ok(ChunkEvent::Incomplete),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ChunkedError::TooManyTrailers {
                    limit: self.max_trailers,
                });
            }
            Err(e) => return Err(ChunkedError::InvalidTrailers(e)),
        };
        if consumed > self.max_trailer_bytes {
            return Err(ChunkedError::TrailersTooLarge {
                limit: self.max_trailer_bytes,
            });
        }
        if has_bare_lf(&buf[..consumed]) {
            return Err(ChunkedError::BareLfInTrailers);
        }
        let trailers = fields
            .iter()
            .map(|f| (f.name.to_owned(), f.value.to_vec()))
            .collect();
        self.state = State::Done;
        Ok(ChunkEvent::End { consumed, trailers })
    }
}

fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

/// Writes a chunk-size line, without extensions.
pub(super) fn write_chunk_size(size: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("{size:X}\r\n").as_bytes());
}

/// Writes the trailer section and the final CRLF. Fields that would change framing or routing
/// are not allowed in trailers (RFC 9110 §6.5.1) and are dropped.
pub(super) fn write_trailers(trailers: &[Field], out: &mut Vec<u8>) {
    const FORBIDDEN: [&str; 8] = [
        "content-length",
        "transfer-encoding",
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ];
    for (name, value) in trailers {
        if FORBIDDEN.iter().any(|f| name.eq_ignore_ascii_case(f)) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes, as a socket might deliver it, and returns the
    /// decoded data, the trailers, and how many input bytes the body took.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Vec<Field>, usize), ChunkedError> {
        let mut decoder = ChunkedDecoder::new(&Limits::default());
        let mut data = Vec::new();
        let mut start = 0;
        let mut available = step.min(input.len());
        loop {
            let event = decoder.decode(&input[start..available])?;
            match event {
                ChunkEvent::Incomplete => {
                    assert!(available < input.len(), "decoder starved at {start}");
                    available = (available + step).min(input.len());
                }
                ChunkEvent::ChunkStart { consumed, .. }
                | ChunkEvent::ChunkEnd { consumed }
                | ChunkEvent::LastChunk { consumed } => start += consumed,
                ChunkEvent::Data { len } => {
                    data.extend_from_slice(&input[start..start + len]);
                    start += len;
                }
                ChunkEvent::End { consumed, trailers } => {
                    assert!(decoder.is_done());
                    return Ok((data, trailers, start + consumed));
                }
            }
        }
    }

    #[test]
    fn chunks_decode_the_same_whatever_the_split() {
        let body =
            b"4\r\nWiki\r\n6;ext=\"x y\"\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, body.len()] {
            let (data, trailers, used) = decode_in_steps(body, step).unwrap();
            assert_eq!(data, b"Wikipedia in \r\n\r\nchunks.", "step {step}");
            assert!(trailers.is_empty());
            assert_eq!(&body[used..], b"NEXT");
        }
    }

    #[test]
    fn trailers_are_parsed() {
        let body = b"1\r\na\r\n0\r\nChecksum: abc\r\nX-B: 2\r\n\r\n";
        let (data, trailers, used) = decode_in_steps(body, 1).unwrap();
        assert_eq!(data, b"a");
        assert_eq!(used, body.len());
        assert_eq!(
            trailers,
            vec![
                ("Checksum".to_owned(), b"abc".to_vec()),
                ("X-B".to_owned(), b"2".to_vec())
            ]
        );
        let mut out = Vec::new();
        write_trailers(
            &[
                ("Content-Length".to_owned(), b"5".to_vec()),
                ("X".to_owned(), b"1".to_vec()),
            ],
            &mut out,
        );
        assert_eq!(out, b"X: 1\r\n\r\n");
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for body in [
            &b"zz\r\n"[..],
            b"\r\n",
            b" 1\r\n",
            b"-1\r\n",
            b"1 2\r\n",
            b"1\n",
            b"1\rx",
            b"+1\r\n",
            b"11111111111111111\r\n",
        ] {
            assert_eq!(
                decode_in_steps(body, 1).map(|_| ()),
                Err(ChunkedError::InvalidSize),
                "{body:?}"
            );
        }
    }

    #[test]
    fn control_bytes_in_extensions_are_rejected() {
        assert_eq!(
            decode_in_steps(b"1;a\nb\r\nx\r\n0\r\n\r\n", 1).map(|_| ()),
            Err(ChunkedError::ControlInSizeLine { byte: b'\n' })
        );
    }

    #[test]
    fn missing_crlf_after_data_is_rejected() {
        for body in [&b"1\r\nab\r\n"[..], b"1\r\na\n0\r\n\r\n", b"1\r\na\rx"] {
            assert_eq!(
                decode_in_steps(body, 1).map(|_| ()),
                Err(ChunkedError::MissingCrlf),
                "{body:?}"
            );
        }
    }

    #[test]
    fn malformed_trailers_are_rejected() {
        assert!(matches!(
            decode_in_steps(b"0\r\nBad Name: x\r\n\r\n", 1),
            Err(ChunkedError::InvalidTrailers(_))
        ));
        assert_eq!(
            decode_in_steps(b"0\r\nA: b\n\r\n", 1).map(|_| ()),
            Err(ChunkedError::BareLfInTrailers)
        );
        assert_eq!(
            decode_in_steps(b"0\r\n\n", 1).map(|_| ()),
            Err(ChunkedError::BareLfInTrailers)
        );
    }

    #[test]
    fn oversized_framing_is_rejected() {
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            decode_in_steps(long.as_bytes(), 512).map(|_| ()),
            Err(ChunkedError::SizeLineTooLong {
                limit: MAX_CHUNK_LINE
            })
        );
        let limits = Limits {
            max_head_bytes: 32,
            max_headers: 1,
            ..Limits::default()
        };
        let mut decoder = ChunkedDecoder::new(&limits);
        assert_eq!(
            decoder.decode(b"0\r\n"),
            Ok(ChunkEvent::LastChunk { consumed: 3 })
        );
        assert_eq!(
            decoder.decode(format!("A: {}", "b".repeat(40)).as_bytes()),
            Err(ChunkedError::TrailersTooLarge { limit: 32 })
        );
        let mut decoder = ChunkedDecoder::new(&limits);
        decoder.decode(b"0\r\n").unwrap();
        assert_eq!(
            decoder.decode(b"A: 1\r\nB: 2\r\n\r\n"),
            Err(ChunkedError::TooManyTrailers { limit: 1 })
        );
    }

    #[test]
    fn huge_chunk_sizes_are_counted_not_allocated() {
        let mut decoder = ChunkedDecoder::new(&Limits::default());
        assert_eq!(
            decoder.decode(b"FFFFFFFFFFFFFFFF\r\n"),
            Ok(ChunkEvent::ChunkStart {
                consumed: 18,
                size: u64::MAX
            })
        );
        assert_eq!(decoder.decode(b"abc"), Ok(ChunkEvent::Data { len: 3 }));
        assert!(!decoder.is_done());
    }

    #[test]
    fn input_after_the_end_is_an_error() {
        let mut decoder = ChunkedDecoder::new(&Limits::default());
        decoder.decode(b"0\r\n").unwrap();
        assert!(matches!(
            decoder.decode(b"\r\n"),
            Ok(ChunkEvent::End { consumed: 2, .. })
        ));
        assert_eq!(decoder.decode(b"x"), Err(ChunkedError::AfterEnd));
    }

    #[test]
    fn chunk_size_lines_are_written_without_extensions() {
        let mut out = Vec::new();
        write_chunk_size(0x1a2b, &mut out);
        assert_eq!(out, b"1A2B\r\n");
    }
}
