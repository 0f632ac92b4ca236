//! One HTTP/2 stream as a byte stream (`AsyncRead` + `AsyncWrite`).
//!
//! The tunnel drives the `h2` crate directly rather than through hyper's
//! client and server: hyper spawns two tasks and allocates two channels for
//! every request (a body pipe and a response map) and wraps an upgraded
//! stream in further boxes, which made up half of a held connection's
//! memory. Here a stream is just h2's two stream handles and the unread
//! rest of the last DATA frame.
//!
//! Flow control: every byte handed to the reader is released back to the
//! peer at once, so the window bounds what h2 buffers, not what the
//! connection carries. Writes send only what the peer's window allows now.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A tunnelled byte stream: one HTTP/2 stream, both directions.
pub struct H2Stream {
    recv: RecvStream,
    send: SendStream<Bytes>,
    /// The unread rest of the last DATA frame.
    unread: Bytes,
    /// END_STREAM sent: shutdown is done, again and again.
    ended: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            recv,
            send,
            unread: Bytes::new(),
            ended: false,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        loop {
            match ready!(self.recv.poll_data(cx)) {
                // END_STREAM: the peer closed its half.
                None => return Poll::Ready(Ok(Bytes::new())),
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    // Consumed as far as the peer's window is concerned:
                    // what is held here is at most one frame.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Ok(data));
                }
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        // The peer ended the stream without error.
                        Some(Reason::NO_ERROR) => Ok(Bytes::new()),
                        _ => Err(to_io(e)),
                    });
                }
            }
        }
    }

    /// Why sending failed: the peer's reset, or the connection's error.
    fn poll_send_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.send.poll_reset(cx).map(reset_to_io)
    }
}

/// A reset (or the connection's error) as seen by a writer: the peer
/// closing or cancelling the stream is a broken pipe.
fn reset_to_io(reset: Result<Reason, h2::Error>) -> io::Error {
    match reset {
        Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => io::ErrorKind::BrokenPipe.into(),
        Ok(reason) => to_io(reason.into()),
        Err(e) => to_io(e),
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            let frame = ready!(self.poll_frame(cx))?;
            self.unread = frame;
        }
        let n = buf.remaining().min(self.unread.len());
        buf.put_slice(&self.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                // h2 0.4 does not answer 0 (it waits instead); should a
                // later version, asking again registers the waker.
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(buf.len());
                    return match this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                        Ok(()) => Poll::Ready(Ok(n)),
                        Err(_) => this.poll_send_error(cx).map(Err),
                    };
                }
                // No capacity will come: the stream was reset or the
                // connection went away.
                _ => return this.poll_send_error(cx).map(Err),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames out as the connection's task polls; nothing is
        // held back here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        if this.send.send_data(Bytes::new(), true).is_ok() {
            this.ended = true;
            return Poll::Ready(Ok(()));
        }
        match ready!(this.send.poll_reset(cx)) {
            // Already closed cleanly by the peer: nothing left to end.
            Ok(Reason::NO_ERROR) => Poll::Ready(Ok(())),
            reset => Poll::Ready(Err(reset_to_io(reset))),
        }
    }
}
