"""The official OpenAI Python SDK, as an application in an enrolled pod
uses it: only `base_url` points at the provider, the key is a placeholder.
Prints one JSON object with what each call returned; any SDK error fails
the run (exit 1) with the error on stderr."""

import json
import sys

import openai

base_url, chat_model, embedding_model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key="placeholder", max_retries=0, timeout=30)
messages = [{"role": "user", "content": "Tell me about yourself"}]
out = {}

chat = client.chat.completions.create(model=chat_model, messages=messages)
out["chat"] = chat.choices[0].message.content
out["chat_usage"] = chat.usage.completion_tokens

chunks = list(client.chat.completions.create(model=chat_model, messages=messages, stream=True))
out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["stream_last_has_choices"] = len(chunks[-1].choices) > 0
out["stream_usage_seen"] = any(getattr(c, "usage", None) for c in chunks)

asked = list(
    client.chat.completions.create(
        model=chat_model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
)
out["asked_usage"] = asked[-1].usage.completion_tokens if asked[-1].usage else None

emb = client.embeddings.create(model=embedding_model, input=["a", "b"])
out["embeddings"] = [len(d.embedding) for d in emb.data]

out["models"] = [m.id for m in client.models.list()]

resp = client.responses.create(model=chat_model, input="Tell me about yourself")
out["responses"] = resp.output_text
out["responses_usage"] = resp.usage.output_tokens

events = list(client.responses.create(model=chat_model, input="count", stream=True))
out["responses_stream"] = "".join(e.delta for e in events if e.type == "response.output_text.delta")

comp = client.completions.create(model=chat_model, prompt="Say hi")
out["completions"] = comp.choices[0].text

print(json.dumps(out))
