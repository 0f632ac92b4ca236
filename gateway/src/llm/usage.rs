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

/// The JSON of an SSE event's `data:` lines, if it has any and they parse.
fn event_json(event: &[u8]) -> Option<serde_json::Value> {
    let data: Vec<u8> = event
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_prefix(b"data:"))
        .flat_map(|d| d.trim_ascii().iter().copied())
        .collect();
    serde_json::from_slice(&data).ok()
}

/// Whether an event is the usage-only chunk a stream ends with when usage
/// was asked for (`"choices": []` and a `usage` object).
fn is_usage_only(v: &serde_json::Value) -> bool {
    v.get("choices")
        .and_then(|c| c.as_array())
        .is_some_and(|c| c.is_empty())
        && v.get("usage").is_some_and(|u| u.is_object())
}

/// Pieces of generated output a chunk carries: one per choice with content
/// (chat `delta.content`, `delta.reasoning_content` or `delta.tool_calls`;
/// completions `text`), one per Responses `*.delta` event. Each piece is at
/// least one token, so the count never exceeds the tokens generated.
pub fn completion_pieces(v: &serde_json::Value) -> u64 {
    if let Some(kind) = v.get("type").and_then(|t| t.as_str()) {
        return u64::from(kind.ends_with(".delta") && v.get("delta").is_some_and(|d| d.as_str() != Some("")));
    }
    let non_empty = |x: Option<&serde_json::Value>| match x {
        Some(serde_json::Value::String(s)) => !s.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        _ => false,
    };
    v.get("choices")
        .and_then(|c| c.as_array())
        .map(|choices| {
            choices
                .iter()
                .filter(|c| {
                    let delta = c.get("delta");
                    non_empty(c.get("text"))
                        || ["content", "reasoning_content", "tool_calls"]
                            .iter()
                            .any(|k| non_empty(delta.and_then(|d| d.get(*k))))
                })
                .count() as u64
        })
        .unwrap_or(0)
}

/// Bytes of generated output a chunk carries (the same fields as
/// `completion_pieces`; tool calls by their JSON). A token is at least one
/// byte, so this bounds from above the tokens the client was sent.
pub fn completion_bytes(v: &serde_json::Value) -> u64 {
    let len = |x: Option<&serde_json::Value>| match x {
        Some(serde_json::Value::String(s)) => s.len() as u64,
        Some(serde_json::Value::Array(a)) if !a.is_empty() => {
            serde_json::to_vec(a).map_or(0, |j| j.len() as u64)
        }
        _ => 0,
    };
    if v.get("type").and_then(|t| t.as_str()).is_some() {
        return len(v.get("delta"));
    }
    v.get("choices")
        .and_then(|c| c.as_array())
        .map(|choices| {
            choices
                .iter()
                .map(|c| {
                    let delta = c.get("delta");
                    len(c.get("text"))
                        + ["content", "reasoning_content", "tool_calls"]
                            .iter()
                            .map(|k| len(delta.and_then(|d| d.get(*k))))
                            .sum::<u64>()
                })
                .sum()
        })
        .unwrap_or(0)
}

/// What ends a stream that ran past the completion its budget reserved: an
/// error event in OpenAI's shape, which SDKs raise as an API error.
fn overrun_event(limit: u64) -> Vec<u8> {
    let error = serde_json::json!({"error": {
        "message": format!("the answer ran past the {limit} completion tokens its token budget reserved; it was ended here"),
        "type": "tokens",
        "code": "budget_exceeded",
    }});
    format!("data: {error}\n\n").into_bytes()
}

/// Passes an SSE stream on event by event (a partial event waits for its
/// end): removes the usage-only chunk the gateway asked for, and ends the
/// stream with an error event before the first event that takes the
/// generated output past `limit` pieces.
#[derive(Debug, Default)]
pub struct SseFilter {
    pending: Vec<u8>,
    hide_usage: bool,
    limit: Option<u64>,
    pieces: u64,
    overrun: bool,
}

impl SseFilter {
    /// Whether this event passes; set `overrun` (and pass nothing more)
    /// when it would go past the limit.
    fn passes(&mut self, event: &[u8]) -> bool {
        if self.overrun {
            return false;
        }
        // Every chunk of a stream passes here: parse only those that matter.
        let usage_candidate = self.hide_usage && event.windows(7).any(|w| w == b"\"usage\"");
        if !usage_candidate && self.limit.is_none() {
            return true;
        }
        let Some(v) = event_json(event) else {
            return true;
        };
        if usage_candidate && is_usage_only(&v) {
            return false;
        }
        if let Some(limit) = self.limit {
            self.pieces += completion_pieces(&v);
            if self.pieces > limit {
                self.overrun = true;
                return false;
            }
        }
        true
    }

    /// The complete events of `pending + data` that pass; the incomplete
    /// tail stays pending.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(pending.len());
        let mut start = 0;
        let mut i = 0;
        while i + 1 < pending.len() && !self.overrun {
            let end = if pending[i..].starts_with(b"\n\n") {
                Some(i + 2)
            } else if pending[i..].starts_with(b"\r\n\r\n") {
                Some(i + 4)
            } else {
                None
            };
            match end {
                Some(end) => {
                    let event = &pending[start..end];
                    if self.passes(event) {
                        out.extend_from_slice(event);
                    }
                    start = end;
                    i = end;
                }
                None => i += 1,
            }
        }
        if self.overrun {
            out.extend(overrun_event(self.limit.unwrap_or(0)));
        } else {
            pending.drain(..start);
            self.pending = pending;
        }
        out
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        if rest.is_empty() || self.overrun {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.passes(&rest) {
            out = rest;
        }
        if self.overrun {
            out.extend(overrun_event(self.limit.unwrap_or(0)));
        }
        out
    }

    /// Whether the stream was ended for running past its limit.
    pub fn overran(&self) -> bool {
        self.overrun
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

/// The fields of a JSON answer that accounting reads, as an object of
/// their own: the rest (choices, messages) is checked but not built.
fn answer_fields(json: &[u8]) -> Option<serde_json::Value> {
    const NAMES: [&str; 3] = ["usage", "model", "response"];
    let fields = super::json::top_level(json, NAMES.map(Some), &[]).ok()?;
    Some(serde_json::Value::Object(
        NAMES
            .iter()
            .zip(fields.values)
            .filter_map(|(name, v)| Some((name.to_string(), v?)))
            .collect(),
    ))
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
        /// Bytes of output seen (see `completion_bytes`).
        bytes: u64,
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
                bytes: 0,
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
                bytes,
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
                                    *bytes += completion_bytes(&v);
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
            Extractor::Json { buf, overflow: false } => match answer_fields(buf) {
                Some(v) => Extracted {
                    usage: usage_of(&v),
                    details: details_of(&v),
                    model: model_of(&v),
                },
                None => Extracted::default(),
            },
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

    /// Bytes of output a stream carried so far (0 for other answers).
    pub fn output_bytes(&self) -> u64 {
        match self {
            Extractor::Sse { bytes, .. } => *bytes,
            _ => 0,
        }
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
    /// Bytes of output a stream carried: at least its tokens.
    pub completion_bytes: u64,
    /// The stream was ended for running past its budget's reservation.
    pub overran: bool,
}

/// Passes a response body through, feeding the extractor, and calls `done`
/// once with the outcome when the body ends or drops.
type OnDone = Box<dyn FnOnce(Outcome) + Send>;

pub struct TappedBody<B> {
    inner: B,
    extractor: Extractor,
    done: Option<OnDone>,
    /// Set when the client's usage chunk is to be removed.
    filter: Option<SseFilter>,
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
        self.filter.get_or_insert_with(SseFilter::default).hide_usage = true;
        self
    }

    /// Ends the stream with an error event before it carries more than
    /// `limit` pieces of output (what a token budget reserved).
    pub fn limiting_completion(mut self, limit: u64) -> Self {
        self.filter.get_or_insert_with(SseFilter::default).limit = Some(limit);
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
                completion_bytes: self.extractor.output_bytes(),
                overran: self.filter.as_ref().is_some_and(SseFilter::overran),
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
                            let mut end = this.inner.is_end_stream();
                            let out = match this.filter.as_mut() {
                                None => data,
                                Some(f) => {
                                    let mut out = f.push(&data);
                                    if end {
                                        out.extend(f.finish());
                                    }
                                    // Past its reservation: the error event
                                    // is the last, and the provider's
                                    // connection is dropped with the body.
                                    end |= f.overran();
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
                    let rest = this.filter.as_mut().map(|f| f.finish()).unwrap_or_default();
                    this.complete(true);
                    this.ended = true;
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

    /// Reading only an answer's accounting fields finds what reading it
    /// whole into a `Value` finds.
    #[test]
    fn json_answers_read_by_their_fields_as_when_read_whole() {
        let answers = [
            r#"{"id":"x","choices":[{"message":{"content":"hi","usage":{"prompt_tokens":99}}}],"model":"qwen","usage":{"prompt_tokens":3,"completion_tokens":72}}"#,
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":1}}}"#,
            r#"{"usage":null,"response":{"model":"r","usage":{"input_tokens":4,"output_tokens":2}}}"#,
            r#"{"usage":[1],"model":7}"#,
            r#"{"model":"","usage":{"prompt_tokens":"3"}}"#,
            r#"{"usage":{"prompt_tokens":3},"bad":"\ud800"}"#,
            r#"[{"usage":{"prompt_tokens":3}}]"#,
            r#"{"usage":{"prompt_tokens":3}} trailing"#,
            "",
        ];
        for answer in answers {
            let whole = match serde_json::from_slice::<serde_json::Value>(answer.as_bytes()) {
                Ok(v) => Extracted {
                    usage: usage_of(&v),
                    details: details_of(&v),
                    model: model_of(&v),
                },
                Err(_) => Extracted::default(),
            };
            let mut e = Extractor::for_content_type(Some("application/json"));
            e.feed(answer.as_bytes());
            assert_eq!(e.finish_all(), whole, "{answer}");
        }
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
            let mut f = SseFilter {
                hide_usage: true,
                ..Default::default()
            };
            let mut out = f.push(&stream.as_bytes()[..split]);
            out.extend(f.push(&stream.as_bytes()[split..]));
            out.extend(f.finish());
            assert_eq!(String::from_utf8(out).unwrap(), want, "split at {split}");
        }
        // CRLF framing, and a stream that ends without a blank line.
        let mut f = SseFilter {
            hide_usage: true,
            ..Default::default()
        };
        let mut out =
            f.push(b"data: {\"choices\":[{}]}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}");
        out.extend(f.finish());
        assert_eq!(out, b"data: {\"choices\":[{}]}\r\n\r\n");
    }

    #[test]
    fn a_stream_past_its_limit_ends_with_an_error_event_between_events() {
        let mut stream =
            String::from("data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n");
        for i in 0..5 {
            stream.push_str(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{i}\"}}}}]}}\n\n"
            ));
        }
        stream.push_str("data: [DONE]\n\n");
        let kept: String = stream.split_inclusive("\n\n").take(4).collect();
        for split in 1..stream.len() {
            let mut f = SseFilter {
                limit: Some(3),
                ..Default::default()
            };
            let mut out = f.push(&stream.as_bytes()[..split]);
            if !f.overran() {
                out.extend(f.push(&stream.as_bytes()[split..]));
                out.extend(f.finish());
            }
            assert!(f.overran(), "split at {split}");
            let out = String::from_utf8(out).unwrap();
            let (head, error) = out.split_at(kept.len());
            assert_eq!(head, kept, "split at {split}");
            assert!(
                error.starts_with("data: {\"error\":") && error.ends_with("}\n\n"),
                "{error}"
            );
            assert!(error.contains("budget_exceeded") && error.matches("\n\n").count() == 1);
        }
        // At the limit exactly, nothing is cut.
        let mut f = SseFilter {
            limit: Some(5),
            ..Default::default()
        };
        let mut out = f.push(stream.as_bytes());
        out.extend(f.finish());
        assert!(!f.overran());
        assert_eq!(String::from_utf8(out).unwrap(), stream);
    }

    #[test]
    fn output_bytes_bound_the_tokens_sent() {
        let v = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
        assert_eq!(
            completion_bytes(&v(r#"{"choices":[{"delta":{"content":"héllo"}},{"text":"ab"}]}"#)),
            8
        );
        assert_eq!(
            completion_bytes(&v(r#"{"type":"response.output_text.delta","delta":"hi"}"#)),
            2
        );
        assert_eq!(
            completion_bytes(&v(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#)),
            0
        );
        assert!(completion_bytes(&v(r#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#)) > 0);
    }

    #[test]
    fn pieces_of_output_are_counted_per_choice_and_delta_event() {
        let v = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
        assert_eq!(
            completion_pieces(&v(
                r#"{"choices":[{"delta":{"content":"a"}},{"delta":{"tool_calls":[{}]}}]}"#
            )),
            2
        );
        assert_eq!(
            completion_pieces(&v(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#)),
            0
        );
        assert_eq!(
            completion_pieces(&v(r#"{"choices":[{"text":"x","index":0}]}"#)),
            1
        );
        assert_eq!(
            completion_pieces(&v(r#"{"choices":[],"usage":{"prompt_tokens":1}}"#)),
            0
        );
        assert_eq!(
            completion_pieces(&v(r#"{"type":"response.output_text.delta","delta":"hi"}"#)),
            1
        );
        assert_eq!(
            completion_pieces(&v(r#"{"type":"response.completed","response":{}}"#)),
            0
        );
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
