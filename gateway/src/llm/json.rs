//! Reading a few top-level fields of a JSON object without building the
//! rest: request bodies and answers are mostly messages and choices the
//! gateway never looks at, and building them as a `Value` (a string per
//! text, a tree node per key) was most of the JSON work per request.

use serde::de::{DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The named fields of an object, by position in the names asked for.
#[derive(Debug)]
pub struct Fields<const N: usize> {
    pub values: [Option<Value>; N],
    /// A named field came more than once (`values` holds the last, as a
    /// parse into `Value` would).
    pub repeated: bool,
    /// Keys in the object, named or not.
    pub keys: usize,
    /// The first guarded name (by position) that a key folds to without
    /// being spelled so, or that two keys fold to (`folds_to`): a provider
    /// whose parser matches keys loosely (Go's `encoding/json`) or keeps
    /// the first of two would read a value the gateway did not.
    pub ambiguous: Option<usize>,
}

/// The fields `names` of the JSON object `json`. It accepts and rejects
/// exactly what `serde_json::from_slice::<Value>` does for an object:
/// every value is parsed through `deserialize_any`, so strings' escapes
/// are decoded (a lone surrogate is an error), numbers are read and
/// nesting depth is counted; only nothing is kept of unnamed fields.
/// A `None` name matches no key. Keys are compared with the `guarded`
/// names (the first 32, lower-case ASCII) as Go's `encoding/json` matches
/// them (`folds_to`), for `Fields::ambiguous`.
pub fn top_level<const N: usize>(
    json: &[u8],
    names: [Option<&str>; N],
    guarded: &[&str],
) -> Result<Fields<N>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let fields = de.deserialize_map(Scan {
        names,
        guarded: &guarded[..guarded.len().min(32)],
    })?;
    de.end()?;
    Ok(fields)
}

struct Scan<'n, 'g, const N: usize> {
    names: [Option<&'n str>; N],
    guarded: &'g [&'g str],
}

impl<'de, const N: usize> Visitor<'de> for Scan<'_, '_, N> {
    type Value = Fields<N>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<N>, A::Error> {
        let mut fields = Fields {
            values: std::array::from_fn(|_| None),
            repeated: false,
            keys: 0,
            ambiguous: None,
        };
        let mut guarded_seen = 0u32;
        while let Some(key) = map.next_key_seed(Classify {
            names: &self.names,
            guarded: self.guarded,
        })? {
            fields.keys += 1;
            if let Some((g, exact)) = key.guarded {
                if !exact || guarded_seen & (1 << g) != 0 {
                    fields.ambiguous = Some(fields.ambiguous.map_or(g, |a| a.min(g)));
                }
                guarded_seen |= 1 << g;
            }
            match key.named {
                Some(i) => fields.repeated |= fields.values[i].replace(map.next_value()?).is_some(),
                None => {
                    map.next_value::<AnyJson>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// Whether `key` is `name` (lower-case ASCII) to a parser that matches
/// keys loosely. Go's `encoding/json` folds case by Unicode's simple case
/// folding: besides ASCII case, the Kelvin sign (U+212A) is a `k` and the
/// long s (U+017F) an `s`, the only characters outside ASCII that fold to
/// ASCII letters (so `"max_to\u212aens"` is `max_tokens` to it). Go's
/// json v2 with case-insensitive names, and pydantic models with camelCase
/// aliases, also take `maxTokens` or `max-tokens`: `_` and `-` are ignored.
fn folds_to(key: &str, name: &str) -> bool {
    let fold = |c: char| match c {
        '\u{212A}' => 'k',
        '\u{17F}' => 's',
        c => c.to_ascii_lowercase(),
    };
    let mut key = key.chars().filter(|c| !matches!(c, '_' | '-')).map(fold);
    name.bytes()
        .filter(|&b| b != b'_')
        .all(|n| key.next() == Some(char::from(n)))
        && key.next().is_none()
}

/// What a key is to the scan.
struct Key {
    /// Its position among the names asked for.
    named: Option<usize>,
    /// The guarded name it folds to, and whether it is spelled so.
    guarded: Option<(usize, bool)>,
}

/// Classifies a key without allocating it.
struct Classify<'a, 'n, 'g, const N: usize> {
    names: &'a [Option<&'n str>; N],
    guarded: &'g [&'g str],
}

impl<'de, const N: usize> DeserializeSeed<'de> for Classify<'_, '_, '_, N> {
    type Value = Key;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<const N: usize> Visitor<'_> for Classify<'_, '_, '_, N> {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(Key {
            named: self.names.iter().position(|n| *n == Some(key)),
            guarded: self
                .guarded
                .iter()
                .position(|g| folds_to(key, g))
                .map(|g| (g, self.guarded[g] == key)),
        })
    }
}

/// Any JSON value, checked and dropped. Unlike `IgnoredAny` (which skips
/// bytes without decoding strings or counting depth), it goes through
/// `deserialize_any`, as `Value` does.
struct AnyJson;

impl<'de> serde::Deserialize<'de> for AnyJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AnyJson, D::Error> {
        d.deserialize_any(AnyJson)
    }
}

impl<'de> Visitor<'de> for AnyJson {
    type Value = AnyJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_i64<E>(self, _: i64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_u64<E>(self, _: u64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_f64<E>(self, _: f64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_str<E>(self, _: &str) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_unit<E>(self) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyJson, A::Error> {
        while seq.next_element::<AnyJson>()?.is_some() {}
        Ok(AnyJson)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyJson, A::Error> {
        while map.next_key::<AnyJson>()?.is_some() {
            map.next_value::<AnyJson>()?;
        }
        Ok(AnyJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts what a parse into `Value` accepts, nothing more: the cases
    /// where skipping (`IgnoredAny`) is laxer are here.
    #[test]
    fn accepts_and_rejects_as_a_value_parse_does() {
        let nested = |depth: usize| format!(r#"{{"a":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        let mut cases: Vec<String> = [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00\ud800"}"#,
            r#"{"a":"\ud83d\ude00","b":[1,-2,3.5,true,null,{}]}"#,
            r#"{"a":1e400}"#,
            r#"{"a":-1e400}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":01}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":1} x"#,
            r#"{"a":"\x"}"#,
            "{\"a\":\"\t\"}",
            "[1]",
            "\"s\"",
            "",
        ]
        .map(String::from)
        .into();
        cases.extend([126, 127, 128, 400].map(nested));
        let mut invalid_utf8 = br#"{"a":"x"}"#.to_vec();
        invalid_utf8[6] = 0xff;
        let mut bytes: Vec<Vec<u8>> = cases.into_iter().map(String::into_bytes).collect();
        bytes.push(invalid_utf8);
        for json in &bytes {
            let value = serde_json::from_slice::<Value>(json);
            let fields = top_level(json, [Some("a")], &[]);
            let case = String::from_utf8_lossy(json);
            match (&value, &fields) {
                (Ok(Value::Object(o)), Ok(f)) => assert_eq!(o.get("a"), f.values[0].as_ref(), "{case}"),
                (Ok(Value::Object(_)), Err(e)) => panic!("{case}: rejected ({e}), Value accepts it"),
                (Ok(_), Ok(_)) => panic!("{case}: not an object, accepted"),
                (Err(_), Ok(_)) => panic!("{case}: accepted, Value rejects it"),
                _ => {}
            }
        }
    }

    #[test]
    fn named_fields_come_back_in_order_with_the_last_of_a_repeat() {
        let f = top_level(
            br#"{"x":[{"model":"inner"}],"model":"a","mod\u0065l":"b","stream":true}"#,
            [Some("stream"), None, Some("model"), Some("absent")],
            &[],
        )
        .unwrap();
        assert_eq!(f.values, [Some(true.into()), None, Some("b".into()), None],);
        assert!(f.repeated);
        assert_eq!(f.keys, 4);
        let f = top_level(br#"{"model":"a"}"#, [Some("model")], &[]).unwrap();
        assert!(!f.repeated);
    }

    #[test]
    fn guarded_names_are_ambiguous_when_twice_or_in_another_case() {
        let guarded = ["model", "max_tokens", "n"];
        let ambiguous = |json: &str| {
            top_level(json.as_bytes(), [Some("model")], &guarded)
                .unwrap()
                .ambiguous
        };
        assert_eq!(ambiguous(r#"{"model":"a","max_tokens":1,"n":2,"N2":1}"#), None);
        assert_eq!(ambiguous(r#"{"model":"a","MAX_TOKENS":1}"#), Some(1));
        assert_eq!(ambiguous(r#"{"max_tokens":1,"max_tokens":2}"#), Some(1));
        assert_eq!(ambiguous(r#"{"Model":"a"}"#), Some(0));
        assert_eq!(ambiguous(r#"{"n":1,"model":"a","model":"b"}"#), Some(0));
        assert_eq!(ambiguous(r#"{"N":1,"max_tokens":1,"max_tokens":2}"#), Some(1));
        // Escapes decode first: an escaped exact spelling is the name.
        assert_eq!(ambiguous(r#"{"m\u006fdel":"a"}"#), None);
        assert_eq!(ambiguous(r#"{"model":"a","m\u006fdel":"b"}"#), Some(0));
        // Nested keys are the provider's business.
        assert_eq!(ambiguous(r#"{"x":{"model":1,"MODEL":2}}"#), None);
        // Go folds the Kelvin sign to k and the long s to s.
        assert_eq!(ambiguous(r#"{"max_to\u212aens":100000}"#), Some(1));
        assert_eq!(ambiguous("{\"max_token\u{17f}\":100000}"), Some(1));
        assert_eq!(ambiguous(r#"{"max_tokens":1,"max_to\u212Aen\u017f":9}"#), Some(1));
        // Nothing else outside ASCII: a dotless i is not an i.
        assert_eq!(ambiguous("{\"max_tokens\":1,\"n\u{131}\":2}"), None);
        // Aliases without the underscore, or with a dash.
        assert_eq!(ambiguous(r#"{"maxTokens":100000}"#), Some(1));
        assert_eq!(ambiguous(r#"{"max-tokens":100000}"#), Some(1));
        assert_eq!(ambiguous(r#"{"max_tokens":1,"maxtokens":2}"#), Some(1));
        assert_eq!(ambiguous(r#"{"_n":2}"#), Some(2));
    }

    /// The fields of OpenAI's chat, completions and Responses requests are
    /// each their own: none folds to another guarded name.
    #[test]
    fn openai_request_fields_are_not_ambiguous() {
        let fields = [
            "messages",
            "model",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "max_tokens",
            "max_completion_tokens",
            "n",
            "presence_penalty",
            "response_format",
            "seed",
            "service_tier",
            "stop",
            "stream",
            "stream_options",
            "temperature",
            "top_p",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "user",
            "reasoning_effort",
            "modalities",
            "audio",
            "prediction",
            "metadata",
            "store",
            "prompt",
            "best_of",
            "echo",
            "suffix",
            "input",
            "instructions",
            "max_output_tokens",
            "previous_response_id",
            "reasoning",
            "text",
            "truncation",
            "include",
            "background",
            "max_tool_calls",
        ];
        let body = format!(
            "{{{}}}",
            fields
                .iter()
                .map(|f| format!(r#""{f}":1"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let f = top_level(body.as_bytes(), [None::<&str>; 0], &crate::llm::provider::GUARDED).unwrap();
        assert_eq!(f.ambiguous, None);
        assert_eq!(f.keys, fields.len());
    }

    #[test]
    fn folding_is_go_s_for_the_guarded_names() {
        assert!(folds_to("MAX_TOKENS", "max_tokens"));
        assert!(folds_to("max_to\u{212A}en\u{17F}", "max_tokens"));
        // json v2 ignores underscores wherever they are.
        assert!(folds_to("max_tokens_", "max_tokens"));
        assert!(!folds_to("max_token", "max_tokens"));
        assert!(!folds_to("m\u{130}del", "model"));
        assert!(!folds_to("", "n"));
        assert!(folds_to("", ""));
        assert!(folds_to("bestOf", "best_of"));
        assert!(folds_to("stream-options", "stream_options"));
        assert!(!folds_to("max_tokens_x", "max_tokens"));
    }
}
