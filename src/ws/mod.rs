//! The WebSocket protocol, as far as the gateway needs it: RFC 6455 framing
//! ([`frame`]), reading client messages with every size checked up front ([`reader`]),
//! and the socket the frames travel on ([`Stream`]). No extensions (permessage-deflate
//! is never negotiated), so the reserved bits must stay clear.

pub mod frame;
pub mod reader;

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

/// The transport under a WebSocket: a TCP connection in production, or one end of a
/// Unix socket pair (the connection loop's tests use those, as an in-memory stream with
/// the same readiness API).
///
/// Only readiness and non-blocking calls are used: a socket owns no read or write
/// buffer of its own; reads go into a buffer shared by the worker's sockets and writes
/// go straight from the shared frames.
#[derive(Debug)]
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_write_ready(cx),
            Stream::Unix(s) => s.poll_write_ready(cx),
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(buf),
            Stream::Unix(s) => s.try_read(buf),
        }
    }

    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write_vectored(bufs),
            Stream::Unix(s) => s.try_write_vectored(bufs),
        }
    }

    /// Sends FIN after the bytes already written; the peer may still send.
    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write),
        };
    }

    /// Makes the coming close abortive: the kernel drops unsent data and answers with a
    /// reset, so a peer that stopped reading cannot keep buffers or the descriptor.
    pub fn discard_unsent_on_close(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_zero_linger();
        }
    }
}
