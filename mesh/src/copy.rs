//! Bidirectional copy that holds no buffer while a connection is idle.
//!
//! `tokio::io::copy_bidirectional` allocates two 8 KiB buffers per
//! connection for its whole life: with 10,000 held connections that is
//! 160 MiB doing nothing. Here each direction reads into a scratch buffer
//! on the polling thread's stack and writes straight on; only bytes that
//! the writer cannot take right now are kept, in a heap buffer sized to
//! them and freed once written. An idle or flowing connection holds
//! nothing; a connection under backpressure holds at most one read.

use std::{
    future::Future,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One read's worth: as large as a TLS record, so bulk transfers take few
/// syscalls.
const SCRATCH: usize = 16 * 1024;

#[derive(Default)]
struct Direction {
    /// Bytes read but not yet written (empty, with no capacity, otherwise).
    pending: Vec<u8>,
    written: usize,
    /// Total bytes written to the other side.
    amount: u64,
    need_flush: bool,
    read_done: bool,
    done: bool,
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.written < self.pending.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                debug_assert!(
                    self.written + n <= self.pending.len(),
                    "writer reported more than it was given"
                );
                self.written += n;
                self.amount += n as u64;
                self.need_flush = true;
            }
            if self.pending.capacity() != 0 {
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.amount));
            }
            let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
            let mut buf = ReadBuf::uninit(&mut scratch);
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            let mut offset = 0;
            while offset < data.len() {
                match writer.as_mut().poll_write(cx, &data[offset..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        debug_assert!(offset + n <= data.len(), "writer reported more than it was given");
                        offset += n;
                        self.amount += n as u64;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Keep only what is left, sized to it.
                        self.pending = data[offset..].to_vec();
                        self.written = 0;
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Heap bytes this direction holds now.
    fn held(&self) -> usize {
        self.pending.capacity()
    }
}

/// Copies `a` to `b` and `b` to `a` until both sides have ended, shutting
/// down each writer when its reader ends. Returns the bytes written to `b`
/// and to `a`, like `tokio::io::copy_bidirectional`.
pub fn copy_bidirectional<'a, A, B>(a: &'a mut A, b: &'a mut B) -> CopyBidirectional<'a, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    CopyBidirectional {
        a,
        b,
        a_to_b: Direction::default(),
        b_to_a: Direction::default(),
    }
}

pub struct CopyBidirectional<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    a_to_b: Direction,
    b_to_a: Direction,
}

impl<A: ?Sized, B: ?Sized> CopyBidirectional<'_, A, B> {
    /// Heap bytes held for data in flight (0 when idle or flowing freely).
    pub fn held(&self) -> usize {
        self.a_to_b.held() + self.b_to_a.held()
    }
}

impl<A, B> Future for CopyBidirectional<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<(u64, u64)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.a_to_b.done {
            if let Poll::Ready(r) = this
                .a_to_b
                .poll_copy(cx, Pin::new(&mut *this.a), Pin::new(&mut *this.b))
            {
                r?;
                this.a_to_b.done = true;
            }
        }
        if !this.b_to_a.done {
            if let Poll::Ready(r) = this
                .b_to_a
                .poll_copy(cx, Pin::new(&mut *this.b), Pin::new(&mut *this.a))
            {
                r?;
                this.b_to_a.done = true;
            }
        }
        if this.a_to_b.done && this.b_to_a.done {
            Poll::Ready(Ok((this.a_to_b.amount, this.b_to_a.amount)))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "the server sees the bytes, then the half-close");
        server.write_all(b"world!").await.unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        assert_eq!(copy.await.unwrap().unwrap(), (5, 6));
    }

    #[tokio::test]
    async fn large_transfer_through_a_slow_writer_arrives_whole_and_is_then_released() {
        // A 1 KiB pipe forces partial writes and the pending path.
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let copy = tokio::spawn(async move {
            let mut copy = copy_bidirectional(&mut a, &mut b);
            let mut max_held = 0;
            let r = std::future::poll_fn(|cx| {
                let r = Pin::new(&mut copy).poll(cx);
                max_held = max_held.max(copy.held());
                r
            })
            .await;
            (r, max_held, copy.held())
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == payload, "every byte, in order");
        drop(server);
        let _client = writer.await.unwrap();
        let (r, max_held, held_after) = copy.await.unwrap();
        assert_eq!(r.unwrap(), (payload.len() as u64, 0));
        assert!(
            max_held > 0 && max_held <= SCRATCH,
            "backpressure kept at most one read ({max_held})"
        );
        assert_eq!(held_after, 0);
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (_client, mut a) = tokio::io::duplex(64);
        let (mut b, _server) = tokio::io::duplex(64);
        let mut copy = copy_bidirectional(&mut a, &mut b);
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut copy).poll(cx).is_pending())).await;
        assert!(polled, "nothing to copy yet");
        assert_eq!(copy.held(), 0);
    }

    #[tokio::test]
    async fn a_read_error_ends_the_copy_with_it() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(b.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let (_client, mut a) = tokio::io::duplex(64);
        let err = copy_bidirectional(&mut a, &mut Broken).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
