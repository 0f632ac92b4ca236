//! What makes the gateway an LLM gateway: the OpenAI API's endpoints, the
//! adaptation of each request to its provider (path, model, stream, key),
//! and token usage read from responses as they stream.

pub mod endpoint;
pub mod json;
pub mod provider;
pub mod usage;
