//! What a tunnelled stream carries: a TLS ClientHello (passed through by
//! SNI) or plain HTTP (the L7 pipeline). The bytes read to decide are
//! replayed by `Prefixed`.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Enough for any real ClientHello (post-quantum key shares included).
const MAX_HELLO: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    Tls {
        sni: Option<String>,
    },
    Http,
    /// The peer closed before sending anything.
    Empty,
}

/// Appends what one read gives to `buf`. The read buffer lives on the
/// stack only while polled, so a stream that waits for its first byte (a
/// held, idle connection) holds no buffer.
async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut read = ReadBuf::uninit(&mut scratch);
        std::task::ready!(Pin::new(&mut *stream).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
    .await
}

/// Reads the first bytes of `stream` into `buf` and classifies them.
pub async fn sniff<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> std::io::Result<Sniffed> {
    let n = read_some(stream, buf).await?;
    if n == 0 {
        return Ok(Sniffed::Empty);
    }
    // TLS handshake record: content type 22, version 3.x.
    if !(buf[0] == 0x16 && (buf.len() < 2 || buf[1] == 0x03)) {
        return Ok(Sniffed::Http);
    }
    // Boxed: rustls's acceptor is over 1 KiB, and would otherwise size
    // every stream's task while it waits for its first byte.
    let mut acceptor = Box::new(rustls::server::Acceptor::default());
    let mut fed = 0;
    loop {
        let mut rd = &buf[fed..];
        while !rd.is_empty() {
            match acceptor.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Ok(Sniffed::Tls { sni: None }),
            }
        }
        fed = buf.len();
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_string);
                return Ok(Sniffed::Tls { sni });
            }
            Ok(None) => {}
            Err(_) => return Ok(Sniffed::Tls { sni: None }),
        }
        if buf.len() >= MAX_HELLO {
            return Ok(Sniffed::Tls { sni: None });
        }
        let n = read_some(stream, buf).await?;
        if n == 0 {
            return Ok(Sniffed::Tls { sni: None });
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(out.remaining());
            let start = self.pos;
            out.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    async fn client_hello(sni: &str) -> Vec<u8> {
        let cfg =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), sni.to_string().try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn finds_sni_even_when_split() {
        let hello = client_hello("dashscope.aliyuncs.com").await;
        let (mut a, mut b) = tokio::io::duplex(64);
        let h = hello.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in h.chunks(50) {
                a.write_all(part).await.unwrap();
            }
            // keep `a` open until the reader finishes
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        });
        let mut buf = Vec::new();
        let s = sniff(&mut b, &mut buf).await.unwrap();
        assert_eq!(
            s,
            Sniffed::Tls {
                sni: Some("dashscope.aliyuncs.com".into())
            }
        );
        assert_eq!(&buf[..], &hello[..buf.len()]);
    }

    #[tokio::test]
    async fn http_is_http_and_replayed() {
        let mut input: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut buf = Vec::new();
        assert_eq!(sniff(&mut input, &mut buf).await.unwrap(), Sniffed::Http);
        let mut p = Prefixed::new(buf, input);
        let mut all = String::new();
        p.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "POST / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    /// Fuzz target: any bytes a pod sends first. Never panics, never reads
    /// more than it may replay, and keeps every byte it read.
    #[test]
    fn fuzz_sniff() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        bolero::check!()
            .with_iterations(crate::FUZZ_ITERATIONS)
            .for_each(|input: &[u8]| {
                let mut buf = Vec::new();
                let mut rd = input;
                let r = rt.block_on(sniff(&mut rd, &mut buf));
                assert!(r.is_ok());
                assert!(buf.len() <= input.len());
                assert_eq!(
                    &buf[..],
                    &input[..buf.len()],
                    "read bytes are replayed as they came"
                );
                assert!(buf.len() <= MAX_HELLO + 4096);
            });
    }
}
