//! Buffered reading and body copying. Bodies move through the read buffer a piece at a time and
//! are never held whole; every read and write of a body is bounded by an inactivity timeout.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::Limits;
use super::chunked::{self, ChunkEvent, ChunkedDecoder, ChunkedError};

/// How much one read asks for.
const READ_CHUNK: usize = 16 * 1024;

/// The read side of a connection with the bytes received but not yet used.
pub(super) struct Inbound<R> {
    io: R,
    buf: Vec<u8>,
    start: usize,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    pub(super) fn new(io: R) -> Self {
        Inbound {
            io,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// The reader itself; what is buffered is dropped.
    pub(super) fn into_inner(self) -> R {
        self.io
    }

    pub(super) fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Drops `n` bytes from the front of [`Inbound::buffered`].
    pub(super) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    pub(super) fn consume_all(&mut self) {
        self.consume(self.buf.len());
    }

    /// Appends what one read returns; 0 means end of stream. Cancel-safe: the bytes already
    /// buffered stay, and a cancelled read has taken nothing.
    pub(super) async fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            // Only a partial element is left at the front; moving it keeps the buffer small.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_CHUNK);
        self.io.read_buf(&mut self.buf).await
    }
}

/// Why a copy stopped, before it is attributed to the client or the upstream.
#[derive(Debug)]
pub(super) enum CopyError {
    Read(io::Error),
    ReadTimeout,
    /// The source ended before the body did.
    Truncated,
    Chunked(ChunkedError),
    Write(io::Error),
    WriteTimeout,
}

/// What a chunked body becomes on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkedOutput {
    /// Chunk by chunk, size lines rewritten without extensions, trailers kept.
    Rechunk,
    /// Data only, for an HTTP/1.0 client that cannot read chunks (the end is a close).
    Dechunk,
}

/// Runs `fut`, giving up after `limit` when there is one.
pub(super) async fn within<F: Future>(limit: Option<Duration>, fut: F) -> Option<F::Output> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Writes all of `bytes` and flushes.
pub(super) async fn write_within<W: AsyncWrite + Unpin>(
    dst: &mut W,
    bytes: &[u8],
    idle: Option<Duration>,
) -> Result<(), CopyError> {
    let write = async {
        dst.write_all(bytes).await?;
        dst.flush().await
    };
    match within(idle, write).await {
        Some(result) => result.map_err(CopyError::Write),
        None => Err(CopyError::WriteTimeout),
    }
}

/// Reads more into `src`; the end of the stream here is a truncated body.
async fn read_more<R: AsyncRead + Unpin>(
    src: &mut Inbound<R>,
    idle: Option<Duration>,
) -> Result<(), CopyError> {
    match within(idle, src.fill()).await {
        None => Err(CopyError::ReadTimeout),
        Some(Err(e)) => Err(CopyError::Read(e)),
        Some(Ok(0)) => Err(CopyError::Truncated),
        Some(Ok(_)) => Ok(()),
    }
}

/// Copies exactly `len` body bytes.
pub(super) async fn copy_exact<R, W>(
    src: &mut Inbound<R>,
    dst: &mut W,
    len: u64,
    idle: Duration,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = len;
    while remaining > 0 {
        if src.buffered().is_empty() {
            read_more(src, Some(idle)).await?;
        }
        let available = src.buffered();
        let n = usize::try_from(remaining).map_or(available.len(), |r| r.min(available.len()));
        write_within(dst, &available[..n], Some(idle)).await?;
        src.consume(n);
        remaining -= n as u64;
    }
    Ok(())
}

/// Copies one chunked body, decoding it and writing it out again as `output` says.
pub(super) async fn copy_chunked<R, W>(
    src: &mut Inbound<R>,
    dst: &mut W,
    limits: &Limits,
    output: ChunkedOutput,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut decoder = ChunkedDecoder::new(limits);
    let mut out = Vec::with_capacity(READ_CHUNK);
    loop {
        let (used, done) = decode_available(&mut decoder, src.buffered(), output, &mut out)
            .map_err(CopyError::Chunked)?;
        src.consume(used);
        if !out.is_empty() {
            write_within(dst, &out, Some(limits.body_timeout)).await?;
            out.clear();
        }
        if done {
            return Ok(());
        }
        read_more(src, Some(limits.body_timeout)).await?;
    }
}

/// Decodes what `buf` holds into `out`; returns the bytes used and whether the body ended.
fn decode_available(
    decoder: &mut ChunkedDecoder,
    buf: &[u8],
    output: ChunkedOutput,
    out: &mut Vec<u8>,
) -> Result<(usize, bool), ChunkedError> {
    let rechunk = output == ChunkedOutput::Rechunk;
    let mut used = 0;
    loop {
        match decoder.decode(&buf[used..])? {
            ChunkEvent::Incomplete => return Ok((used, false)),
            ChunkEvent::ChunkStart { consumed, size } => {
                if rechunk {
                    chunked::write_chunk_size(size, out);
                }
                used += consumed;
            }
            ChunkEvent::Data { len } => {
                out.extend_from_slice(&buf[used..used + len]);
                used += len;
            }
            ChunkEvent::ChunkEnd { consumed } => {
                if rechunk {
                    out.extend_from_slice(b"\r\n");
                }
                used += consumed;
            }
            ChunkEvent::LastChunk { consumed } => {
                if rechunk {
                    out.extend_from_slice(b"0\r\n");
                }
                used += consumed;
            }
            ChunkEvent::End { consumed, trailers } => {
                if rechunk {
                    chunked::write_trailers(&trailers, out);
                }
                return Ok((used + consumed, true));
            }
        }
    }
}

/// Copies until `src` ends, then returns; `idle` bounds each read and write when set, and
/// `counted`, when given, grows by every byte written.
pub(super) async fn copy_until_close<R, W>(
    src: &mut Inbound<R>,
    dst: &mut W,
    idle: Option<Duration>,
    counted: Option<&AtomicU64>,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let n = src.buffered().len();
        if n > 0 {
            write_within(dst, src.buffered(), idle).await?;
            src.consume_all();
            if let Some(counted) = counted {
                counted.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        match read_more(src, idle).await {
            Err(CopyError::Truncated) => return Ok(()),
            other => other?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inbound_keeps_unconsumed_bytes_across_reads() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut inbound = Inbound::new(ours);
        peer.write_all(b"abc").await.unwrap();
        assert_eq!(inbound.fill().await.unwrap(), 3);
        inbound.consume(1);
        peer.write_all(b"de").await.unwrap();
        inbound.fill().await.unwrap();
        assert_eq!(inbound.buffered(), b"bcde");
        inbound.consume(10);
        assert!(inbound.buffered().is_empty());
        drop(peer);
        assert_eq!(inbound.fill().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn exact_copy_leaves_what_follows() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut inbound = Inbound::new(ours);
        peer.write_all(b"hello world").await.unwrap();
        let mut out = Vec::new();
        copy_exact(&mut inbound, &mut out, 5, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(inbound.buffered(), b" world");
    }

    #[tokio::test]
    async fn exact_copy_of_a_truncated_body_fails() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut inbound = Inbound::new(ours);
        peer.write_all(b"hel").await.unwrap();
        drop(peer);
        let mut out = Vec::new();
        let result = copy_exact(&mut inbound, &mut out, 5, Duration::from_secs(1)).await;
        assert!(matches!(result, Err(CopyError::Truncated)));
    }

    #[tokio::test]
    async fn chunked_copy_rechunks_or_dechunks() {
        let body = b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\nrest";
        for (output, expected) in [
            (
                ChunkedOutput::Rechunk,
                &b"3\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"[..],
            ),
            (ChunkedOutput::Dechunk, b"abcde"),
        ] {
            let (mut peer, ours) = tokio::io::duplex(4);
            let mut inbound = Inbound::new(ours);
            let writer = tokio::spawn(async move {
                peer.write_all(body).await.unwrap();
                peer
            });
            let mut out = Vec::new();
            copy_chunked(&mut inbound, &mut out, &Limits::default(), output)
                .await
                .unwrap();
            assert_eq!(out, expected);
            let _peer = writer.await.unwrap();
            while inbound.buffered().len() < 4 {
                inbound.fill().await.unwrap();
            }
            assert_eq!(inbound.buffered(), b"rest");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_body_times_out() {
        let (_peer, ours) = tokio::io::duplex(64);
        let mut inbound = Inbound::new(ours);
        let mut out = Vec::new();
        let result = copy_exact(&mut inbound, &mut out, 5, Duration::from_secs(1)).await;
        assert!(matches!(result, Err(CopyError::ReadTimeout)));
    }
}
