//! Token accounting from responses as they stream past: the `usage` object
//! of a JSON completion, or of the last SSE chunk that carries one. Frames
//! are forwarded as they arrive; only what usage parsing needs is kept.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

fn usage_of(v: &serde_json::Value) -> Option<Usage> {
    let u = v.get("usage")?;
    Some(Usage {
        prompt_tokens: u.get("prompt_tokens")?.as_u64()?,
        completion_tokens: u.get("completion_tokens").and_then(|c| c.as_u64()).unwrap_or(0),
    })
}

/// Bodies larger than this are not parsed for usage (they still pass).
const MAX_JSON: usize = 4 << 20;
const MAX_LINE: usize = 1 << 20;

/// Incremental extractor for one response.
#[derive(Debug)]
pub enum Extractor {
    Json { buf: Vec<u8>, overflow: bool },
    Sse { line: Vec<u8>, last: Option<Usage> },
    None,
}

impl Extractor {
    pub fn for_content_type(ct: Option<&str>) -> Extractor {
        match ct.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
            Some(c) if c == "text/event-stream" => Extractor::Sse {
                line: Vec::new(),
                last: None,
            },
            Some(c) if c == "application/json" || c.ends_with("+json") => Extractor::Json {
                buf: Vec::new(),
                overflow: false,
            },
            _ => Extractor::None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            Extractor::Json { buf, overflow } => {
                if buf.len() + chunk.len() > MAX_JSON {
                    *overflow = true;
                    buf.clear();
                } else if !*overflow {
                    buf.extend_from_slice(chunk);
                }
            }
            Extractor::Sse { line, last } => {
                for &b in chunk {
                    if b == b'\n' {
                        if let Some(data) = line.strip_prefix(b"data:") {
                            let data = data.trim_ascii();
                            if data != b"[DONE]" {
                                if let Some(u) = serde_json::from_slice(data).ok().as_ref().and_then(usage_of)
                                {
                                    *last = Some(u);
                                }
                            }
                        }
                        line.clear();
                    } else if line.len() < MAX_LINE {
                        line.push(b);
                    }
                }
            }
            Extractor::None => {}
        }
    }

    pub fn finish(&mut self) -> Option<Usage> {
        // A stream may end without a final newline.
        if matches!(self, Extractor::Sse { line, .. } if !line.is_empty()) {
            self.feed(b"\n");
        }
        match self {
            Extractor::Json { buf, overflow: false } => {
                serde_json::from_slice(buf).ok().as_ref().and_then(usage_of)
            }
            Extractor::Sse { last, .. } => *last,
            _ => None,
        }
    }
}

/// Passes a response body through unchanged, feeding the extractor, and
/// calls `done` once with the usage (if any) when the body ends or drops.
/// Called once with the usage seen and whether the body ended normally.
type OnDone = Box<dyn FnOnce(Option<Usage>, bool) + Send>;

pub struct TappedBody<B> {
    inner: B,
    extractor: Extractor,
    done: Option<OnDone>,
}

impl<B> TappedBody<B> {
    pub fn new(
        inner: B,
        extractor: Extractor,
        done: impl FnOnce(Option<Usage>, bool) + Send + 'static,
    ) -> Self {
        TappedBody {
            inner,
            extractor,
            done: Some(Box::new(done)),
        }
    }

    fn complete(&mut self, finished: bool) {
        if let Some(done) = self.done.take() {
            let usage = self.extractor.finish();
            done(usage, finished);
        }
    }
}

impl<B> Drop for TappedBody<B> {
    fn drop(&mut self) {
        // The client went away before the end: still account what we saw.
        self.complete(false);
    }
}

impl<B> Body for TappedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.extractor.feed(data);
                }
                // hyper stops polling once a body reports its end, so the
                // last frame is where a complete response is accounted.
                if this.inner.is_end_stream() {
                    this.complete(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.complete(true);
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage() {
        let mut e = Extractor::for_content_type(Some("application/json; charset=utf-8"));
        let body = br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":72,"total_tokens":75}}"#;
        e.feed(&body[..10]);
        e.feed(&body[10..]);
        assert_eq!(
            e.finish(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 72
            })
        );
    }

    #[test]
    fn sse_usage_from_the_final_chunk_split_anywhere() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        for split in [1, 7, 40, 90, stream.len() - 1] {
            let mut e = Extractor::for_content_type(Some("text/event-stream"));
            e.feed(&stream.as_bytes()[..split]);
            e.feed(&stream.as_bytes()[split..]);
            assert_eq!(
                e.finish(),
                Some(Usage {
                    prompt_tokens: 5,
                    completion_tokens: 9
                }),
                "split at {split}"
            );
        }
    }

    #[test]
    fn no_usage_is_none() {
        let mut e = Extractor::for_content_type(Some("text/event-stream"));
        e.feed(b"data: {\"choices\":[]}\n\n");
        assert_eq!(e.finish(), None);
        let mut e = Extractor::for_content_type(Some("text/plain"));
        e.feed(b"{\"usage\":{\"prompt_tokens\":1}}");
        assert_eq!(e.finish(), None);
        let mut e = Extractor::for_content_type(Some("application/json"));
        e.feed(b"not json");
        assert_eq!(e.finish(), None);
    }

    /// Fuzz target: any SSE or JSON body, cut anywhere. Never panics, and the
    /// usage found does not depend on how the body was split into frames.
    #[test]
    fn fuzz_usage_parsers() {
        bolero::check!()
            .with_type::<(bool, Vec<u16>, Vec<u8>)>()
            .with_iterations(crate::FUZZ_ITERATIONS)
            .for_each(|(sse, cuts, body)| {
                let ct = if *sse {
                    "text/event-stream"
                } else {
                    "application/json"
                };
                let mut whole = Extractor::for_content_type(Some(ct));
                whole.feed(body);
                let expected = whole.finish();
                let mut split = Extractor::for_content_type(Some(ct));
                let mut at = 0;
                for c in cuts {
                    let end = (at + *c as usize % 64).min(body.len());
                    split.feed(&body[at..end]);
                    at = end;
                }
                split.feed(&body[at..]);
                assert_eq!(split.finish(), expected);
            });
    }

    #[test]
    fn fuzz_usage_parsers_on_real_streams() {
        // Structured inputs: real chunks with a usage of fuzzed numbers.
        bolero::check!()
            .with_type::<(u64, u64, u8)>()
            .with_iterations(crate::FUZZ_ITERATIONS)
            .for_each(|(p, c, n)| {
                let mut body = String::new();
                for i in 0..*n % 8 {
                    body.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{i}\"}}}}]}}\n\n"));
                }
                body.push_str(&format!(
                    "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}\n\ndata: [DONE]\n\n"
                ));
                let mut e = Extractor::for_content_type(Some("text/event-stream"));
                for b in body.as_bytes().chunks(7) {
                    e.feed(b);
                }
                assert_eq!(
                    e.finish(),
                    Some(Usage {
                        prompt_tokens: *p,
                        completion_tokens: *c
                    })
                );
            });
    }
}
