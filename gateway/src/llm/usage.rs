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

/// Usage of a chat/completions answer or chunk (`prompt_tokens`,
/// `completion_tokens`), or of the Responses API (`input_tokens`,
/// `output_tokens`, at the top or under `response` in its stream events).
fn usage_of(v: &serde_json::Value) -> Option<Usage> {
    let u = v
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| v.get("response")?.get("usage").filter(|u| u.is_object()))?;
    let count = |a: &str, b: &str| u.get(a).or_else(|| u.get(b)).and_then(|n| n.as_u64());
    Some(Usage {
        prompt_tokens: count("prompt_tokens", "input_tokens")?,
        completion_tokens: count("completion_tokens", "output_tokens").unwrap_or(0),
    })
}

/// Token details some providers report: prompt tokens served from a cache,
/// and completion tokens spent on reasoning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenDetails {
    pub cached_input: u64,
    pub reasoning_output: u64,
}

fn details_of(v: &serde_json::Value) -> Option<TokenDetails> {
    let u = v
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| v.get("response")?.get("usage").filter(|u| u.is_object()))?;
    let nested = |outer: &[&str], inner: &str| {
        outer
            .iter()
            .find_map(|o| u.get(*o)?.get(inner)?.as_u64())
            .unwrap_or(0)
    };
    let d = TokenDetails {
        cached_input: nested(
            &["prompt_tokens_details", "input_tokens_details"],
            "cached_tokens",
        ),
        reasoning_output: nested(
            &["completion_tokens_details", "output_tokens_details"],
            "reasoning_tokens",
        ),
    };
    (d != TokenDetails::default()).then_some(d)
}

/// Whether an SSE event is the usage-only chunk a stream ends with when
/// usage was asked for (`"choices": []` and a `usage` object).
fn is_usage_only_event(event: &[u8]) -> bool {
    // Every chunk of a stream passes here: parse only those that can be it.
    if !event.windows(7).any(|w| w == b"\"usage\"") {
        return false;
    }
    let data: Vec<u8> = event
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_prefix(b"data:"))
        .flat_map(|d| d.trim_ascii().iter().copied())
        .collect();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
        return false;
    };
    v.get("choices")
        .and_then(|c| c.as_array())
        .is_some_and(|c| c.is_empty())
        && v.get("usage").is_some_and(|u| u.is_object())
}

/// Removes the usage-only chunk from an SSE stream, forwarding every other
/// event as soon as it is complete (a partial event waits for its end).
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    pending: Vec<u8>,
}

impl UsageChunkFilter {
    /// The complete events of `pending + data` except usage-only ones; the
    /// incomplete tail stays pending.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        let mut i = 0;
        while i + 1 < self.pending.len() {
            let end = if self.pending[i..].starts_with(b"\n\n") {
                Some(i + 2)
            } else if self.pending[i..].starts_with(b"\r\n\r\n") {
                Some(i + 4)
            } else {
                None
            };
            match end {
                Some(end) => {
                    let event = &self.pending[start..end];
                    if !is_usage_only_event(event) {
                        out.extend_from_slice(event);
                    }
                    start = end;
                    i = end;
                }
                None => i += 1,
            }
        }
        self.pending.drain(..start);
        out
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        if is_usage_only_event(&rest) {
            Vec::new()
        } else {
            rest
        }
    }
}

/// Bodies larger than this are not parsed for usage (they still pass).
const MAX_JSON: usize = 4 << 20;
const MAX_LINE: usize = 1 << 20;

/// The model an answer names (`model`, or `response.model` in Responses
/// stream events).
fn model_of(v: &serde_json::Value) -> Option<String> {
    v.get("model")
        .or_else(|| v.get("response")?.get("model"))
        .and_then(|m| m.as_str())
        .filter(|m| !m.is_empty() && m.len() <= 256)
        .map(str::to_string)
}

/// Incremental extractor for one response.
#[derive(Debug)]
pub enum Extractor {
    Json {
        buf: Vec<u8>,
        overflow: bool,
    },
    Sse {
        line: Vec<u8>,
        last: Option<Usage>,
        details: Option<TokenDetails>,
        model: Option<String>,
    },
    None,
}

impl Extractor {
    pub fn for_content_type(ct: Option<&str>) -> Extractor {
        match ct.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
            Some(c) if c == "text/event-stream" => Extractor::Sse {
                line: Vec::new(),
                last: None,
                details: None,
                model: None,
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
            Extractor::Sse {
                line,
                last,
                details,
                model,
            } => {
                for &b in chunk {
                    if b == b'\n' {
                        if let Some(data) = line.strip_prefix(b"data:") {
                            let data = data.trim_ascii();
                            if data != b"[DONE]" {
                                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                                    if let Some(u) = usage_of(&v) {
                                        *last = Some(u);
                                        *details = details_of(&v);
                                    }
                                    if model.is_none() {
                                        *model = model_of(&v);
                                    }
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

    /// The usage alone (tests and fuzz targets).
    #[cfg(test)]
    pub fn finish(&mut self) -> Option<Usage> {
        self.finish_all().usage
    }

    /// The usage, its details and the model the answer named.
    pub fn finish_all(&mut self) -> Extracted {
        // A stream may end without a final newline.
        if matches!(self, Extractor::Sse { line, .. } if !line.is_empty()) {
            self.feed(b"\n");
        }
        match self {
            Extractor::Json { buf, overflow: false } => {
                match serde_json::from_slice::<serde_json::Value>(buf) {
                    Ok(v) => Extracted {
                        usage: usage_of(&v),
                        details: details_of(&v),
                        model: model_of(&v),
                    },
                    Err(_) => Extracted::default(),
                }
            }
            Extractor::Sse {
                last, details, model, ..
            } => Extracted {
                usage: *last,
                details: *details,
                model: model.clone(),
            },
            _ => Extracted::default(),
        }
    }

    pub fn is_stream(&self) -> bool {
        matches!(self, Extractor::Sse { .. })
    }
}

/// What an answer said about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extracted {
    pub usage: Option<Usage>,
    pub details: Option<TokenDetails>,
    pub model: Option<String>,
}

/// What a response turned out to be, once it ended (or was dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub usage: Option<Usage>,
    pub details: Option<TokenDetails>,
    /// The model the answer named.
    pub response_model: Option<String>,
    /// Whether the body ended normally (not cut by the client).
    pub finished: bool,
    /// When the first data arrived, for a streamed (SSE) answer.
    pub first_chunk_at: Option<std::time::Instant>,
}

/// Passes a response body through, feeding the extractor, and calls `done`
/// once with the outcome when the body ends or drops.
type OnDone = Box<dyn FnOnce(Outcome) + Send>;

pub struct TappedBody<B> {
    inner: B,
    extractor: Extractor,
    done: Option<OnDone>,
    /// Set when the client's usage chunk is to be removed.
    filter: Option<UsageChunkFilter>,
    ended: bool,
    first_chunk_at: Option<std::time::Instant>,
}

impl<B> TappedBody<B> {
    pub fn new(inner: B, extractor: Extractor, done: impl FnOnce(Outcome) + Send + 'static) -> Self {
        TappedBody {
            inner,
            extractor,
            done: Some(Box::new(done)),
            filter: None,
            ended: false,
            first_chunk_at: None,
        }
    }

    /// Removes the usage-only chunk the gateway asked for (the usage is
    /// still counted).
    pub fn hiding_usage_chunk(mut self) -> Self {
        self.filter = Some(UsageChunkFilter::default());
        self
    }

    fn complete(&mut self, finished: bool) {
        if let Some(done) = self.done.take() {
            let e = self.extractor.finish_all();
            done(Outcome {
                usage: e.usage,
                details: e.details,
                response_model: e.model,
                finished,
                first_chunk_at: self.first_chunk_at,
            });
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
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            if this.first_chunk_at.is_none() && !data.is_empty() && this.extractor.is_stream()
                            {
                                this.first_chunk_at = Some(std::time::Instant::now());
                            }
                            this.extractor.feed(&data);
                            let end = this.inner.is_end_stream();
                            let out = match this.filter.as_mut() {
                                None => data,
                                Some(f) => {
                                    let mut out = f.push(&data);
                                    if end {
                                        out.extend(f.finish());
                                    }
                                    Bytes::from(out)
                                }
                            };
                            // hyper stops polling once a body reports its
                            // end, so the last frame is where a complete
                            // response is accounted.
                            if end {
                                this.complete(true);
                                this.ended = true;
                            }
                            if out.is_empty() && !end {
                                continue;
                            }
                            Frame::data(out)
                        }
                        Err(frame) => frame,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    this.complete(true);
                    this.ended = true;
                    let rest = this.filter.as_mut().map(|f| f.finish()).unwrap_or_default();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.filter.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        // Removing a chunk changes the length.
        match self.filter {
            None => self.inner.size_hint(),
            Some(_) => hyper::body::SizeHint::default(),
        }
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
    fn responses_api_usage_is_counted_from_json_and_stream_events() {
        let mut e = Extractor::for_content_type(Some("application/json"));
        e.feed(br#"{"object":"response","usage":{"input_tokens":11,"output_tokens":7,"input_tokens_details":{"cached_tokens":4},"output_tokens_details":{"reasoning_tokens":2}}}"#);
        assert_eq!(
            e.finish(),
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 7
            })
        );
        let mut e = Extractor::for_content_type(Some("text/event-stream"));
        e.feed(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":3}}}\n\n");
        assert_eq!(
            e.finish(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3
            })
        );
    }

    #[test]
    fn the_usage_chunk_is_removed_and_everything_else_kept_however_split() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        let want =
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut f = UsageChunkFilter::default();
            let mut out = f.push(&stream.as_bytes()[..split]);
            out.extend(f.push(&stream.as_bytes()[split..]));
            out.extend(f.finish());
            assert_eq!(String::from_utf8(out).unwrap(), want, "split at {split}");
        }
        // CRLF framing, and a stream that ends without a blank line.
        let mut f = UsageChunkFilter::default();
        let mut out =
            f.push(b"data: {\"choices\":[{}]}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}");
        out.extend(f.finish());
        assert_eq!(out, b"data: {\"choices\":[{}]}\r\n\r\n");
    }

    #[tokio::test]
    async fn a_tapped_body_hides_the_usage_chunk_but_counts_it() {
        use http_body_util::BodyExt;
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"cho",
            "ices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
            "data: [DONE]\n\n",
        ]
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
        let inner = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let s = seen.clone();
        let body = TappedBody::new(
            inner,
            Extractor::for_content_type(Some("text/event-stream")),
            move |o: Outcome| {
                *s.lock().unwrap() = Some((o.usage, o.finished));
            },
        )
        .hiding_usage_chunk();
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            Some((
                Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4
                }),
                true
            ))
        );
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
