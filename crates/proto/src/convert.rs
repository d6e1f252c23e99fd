//! Conversions between the gateway's public messages and the mesh-internal generation messages.
//!
//! The pairs carry the same fields by design (see the .proto files), so each conversion is a plain
//! field-by-field move. Struct literals are exhaustive: a field added to one side and not the other
//! fails to compile here, which keeps the pairs in step.

use crate::{gateway::v1 as gw, generation::v1 as gen_v1};

macro_rules! move_fields {
    ($from:ty => $to:ty { $($field:ident),* $(,)? } $(+ { $($extra:ident: $value:expr),* $(,)? })?) => {
        impl From<$from> for $to {
            fn from(from: $from) -> Self {
                Self { $($field: from.$field,)* $($($extra: $value,)*)? }
            }
        }
    };
}

macro_rules! request_fields {
    ($from:ty => $to:ty) => {
        move_fields!($from => $to {
            model, prompt, messages, max_tokens, temperature, top_p, stop, seed, user, metadata, cache,
            idempotency_key,
        });
    };
}

request_fields!(gw::GenerateRequest => gen_v1::GenerateRequest);
request_fields!(gw::GenerateStreamRequest => gen_v1::GenerateRequest);
request_fields!(gen_v1::GenerateRequest => gen_v1::GenerateStreamRequest);
request_fields!(gen_v1::GenerateStreamRequest => gen_v1::GenerateRequest);

move_fields!(gw::SubmitJobRequest => gen_v1::GenerateRequest {
    model, prompt, messages, max_tokens, temperature, top_p, stop, seed, user, metadata, idempotency_key,
} + { cache: 0 });

macro_rules! response_fields {
    ($from:ty => $to:ty) => {
        move_fields!($from => $to {
            id, model, text, finish_reason, usage, cached, degraded, provider,
        });
    };
}

response_fields!(gen_v1::GenerateResponse => gw::GenerateResponse);

macro_rules! chunk_fields {
    ($from:ty => $to:ty) => {
        move_fields!($from => $to {
            id, model, delta, finish_reason, usage, cached, degraded, provider,
        });
    };
}

chunk_fields!(gen_v1::GenerateStreamResponse => gw::GenerateStreamResponse);

move_fields!(gen_v1::Model => gw::Model { name, provider, upstream_model, deterministic });

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::v1::ChatMessage;

    #[test]
    fn gateway_request_keeps_every_field() {
        let public = gw::GenerateRequest {
            model: "sim".into(),
            prompt: String::new(),
            messages: vec![ChatMessage { role: "user".into(), content: "hi".into() }],
            max_tokens: 7,
            temperature: Some(0.5),
            top_p: Some(0.9),
            stop: vec!["\n".into()],
            seed: Some(42),
            user: "u1".into(),
            metadata: [("k".to_string(), "v".to_string())].into(),
            cache: 3,
            idempotency_key: "idem".into(),
        };
        let internal: gen_v1::GenerateRequest = public.clone().into();
        // Same field numbers on both sides: the encodings are byte-identical.
        assert_eq!(prost::Message::encode_to_vec(&public), prost::Message::encode_to_vec(&internal));
    }
}
