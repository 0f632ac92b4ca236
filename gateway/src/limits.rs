//! Deadlines and size limits for what clients send. Every wait on a client
//! ends: the first bytes of a stream (sniff), the request head, each part of
//! a request body, and any connection where nothing moves either way (idle
//! keep-alive, passthrough copies). Each expiry is counted by stage.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest request head (request line and headers) a client may send;
/// larger heads are answered `431`.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Most header fields in one request head.
pub const MAX_HEADERS: usize = 100;

/// The deadlines, from the gateway's flags.
#[derive(Debug, Clone, Copy)]
pub struct ClientDeadlines {
    /// From a tunnel stream's opening to its first byte.
    pub sniff: Duration,
    /// From a connection's opening (or its previous request) to a complete request head.
    pub request_head: Duration,
    /// Longest pause inside a request body.
    pub body_idle: Duration,
    /// Longest time nothing moves either way on a connection.
    pub idle: Duration,
}

impl Default for ClientDeadlines {
    fn default() -> Self {
        ClientDeadlines {
            sniff: Duration::from_secs(10),
            request_head: Duration::from_secs(10),
            body_idle: Duration::from_secs(30),
            idle: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes; raise --max-request-body if this is intended")]
    TooLarge(usize),
    #[error("the request body stalled for {0:?}; send it without pauses")]
    Stalled(Duration),
    #[error("the request body took longer than {0:?}")]
    TooSlow(Duration),
    #[error("could not read the request body")]
    Read,
}

/// Longest a whole request body may take, however steadily it trickles.
pub const BODY_TOTAL: Duration = Duration::from_secs(120);

/// The next data of a body (`None` at its end), waiting at most `idle`
/// and never past `end`.
async fn next_data<B>(
    body: &mut B,
    idle: Duration,
    end: tokio::time::Instant,
) -> Result<Option<Bytes>, BodyError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    loop {
        let wait = idle.min(end.saturating_duration_since(tokio::time::Instant::now()));
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) if wait < idle => return Err(BodyError::TooSlow(BODY_TOTAL)),
            Err(_) => return Err(BodyError::Stalled(idle)),
            Ok(None) => return Ok(None),
            Ok(Some(Err(_))) => return Err(BodyError::Read),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

/// Reads a whole request body of at most `max` bytes, allowing at most
/// `idle` between two of its frames and `BODY_TOTAL` in all.
pub async fn read_body<B>(mut body: B, max: usize, idle: Duration) -> Result<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut out = BytesMut::new();
    let end = tokio::time::Instant::now() + BODY_TOTAL;
    while let Some(data) = next_data(&mut body, idle, end).await? {
        if out.len() + data.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

/// A request body whose start may have been read already (for an external
/// authorizer's check); it is sent on as if it had not.
pub struct Prefixed<B> {
    buffered: Bytes,
    rest: B,
    /// `rest` has ended.
    done: bool,
}

impl<B> Prefixed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    pub fn new(rest: B) -> Self {
        Prefixed {
            buffered: Bytes::new(),
            rest,
            done: false,
        }
    }

    /// Reads until more than `max` bytes are held or the body ends (with
    /// the same deadlines as `read_body`); whether it ended.
    pub async fn buffer(&mut self, max: usize, idle: Duration) -> Result<bool, BodyError> {
        let mut out = BytesMut::from(std::mem::take(&mut self.buffered));
        let end = tokio::time::Instant::now() + BODY_TOTAL;
        while out.len() <= max {
            match next_data(&mut self.rest, idle, end).await? {
                Some(data) => out.extend_from_slice(&data),
                None => {
                    self.done = true;
                    break;
                }
            }
        }
        self.buffered = out.freeze();
        Ok(self.done)
    }

    /// What was read ahead.
    pub fn buffered(&self) -> &[u8] {
        &self.buffered
    }
}

impl<B> http_body::Body for Prefixed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        if !self.buffered.is_empty() {
            let data = std::mem::take(&mut self.buffered);
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && (self.done || self.rest.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.size_hint();
        let extra = self.buffered.len() as u64;
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower() + extra);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

/// A stream that fails with `TimedOut` once nothing was read or written
/// for `idle`. The timer is re-armed by progress in either direction, so a
/// long streamed answer to a quiet client stays up.
pub struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn progress(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.timer.as_mut().reset(at);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle for too long")
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.progress();
                }
                Poll::Ready(r)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether an I/O error is our idle deadline.
pub fn is_idle_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_body_read_ahead_is_sent_on_whole_and_in_order() {
        let frames = || {
            let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> =
                ["abc", "def", "ghi"]
                    .iter()
                    .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes()))))
                    .collect();
            StreamBody::new(futures::stream::iter(chunks))
        };
        // Past the limit: more than 4 bytes held, the body not ended.
        let mut body = Prefixed::new(frames());
        assert!(!body.buffer(4, Duration::from_secs(1)).await.unwrap());
        assert_eq!(body.buffered(), b"abcdef");
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcdefghi");
        // Within the limit: all of it, ended.
        let mut body = Prefixed::new(frames());
        assert!(body.buffer(100, Duration::from_secs(1)).await.unwrap());
        assert_eq!(body.buffered(), b"abcdefghi");
        assert!(!http_body::Body::is_end_stream(&body));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcdefghi");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_cut_after_the_idle_deadline_and_traffic_keeps_it_up() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = IdleTimeout::new(a, Duration::from_secs(5));
        // Traffic every 3 s keeps it open past 5 s.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            b.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            a.read_exact(&mut one).await.unwrap();
        }
        let mut buf = [0u8; 8];
        let err = a.read(&mut buf).await.unwrap_err();
        assert!(is_idle_timeout(&err), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_half_way_is_refused_and_a_large_one_too() {
        type Frame = Result<http_body::Frame<Bytes>, std::convert::Infallible>;
        let (mut tx, rx) = futures::channel::mpsc::channel::<Frame>(4);
        futures::SinkExt::send(
            &mut tx,
            Ok(http_body::Frame::data(Bytes::from_static(b"{\"messages\":"))),
        )
        .await
        .unwrap();
        let body = StreamBody::new(rx);
        let r = read_body(body, 1024, Duration::from_secs(2)).await;
        assert!(matches!(r, Err(BodyError::Stalled(_))), "{r:?}");
        drop(tx);

        let full = http_body_util::Full::new(Bytes::from(vec![b'a'; 2048]));
        let r = read_body(full, 1024, Duration::from_secs(2)).await;
        assert!(matches!(r, Err(BodyError::TooLarge(1024))), "{r:?}");
        let ok = read_body(
            http_body_util::Full::new(Bytes::from_static(b"{}")),
            1024,
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"{}"));
    }
}
