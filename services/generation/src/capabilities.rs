//! What a model takes besides text, held to its catalog: a model whose catalog lists its
//! `capabilities` is refused a request that needs one it does not list, with INVALID_ARGUMENT
//! naming the field, before any upstream is called (an upstream would refuse it too, in its own
//! words, or worse, ignore it: a JSON schema silently not applied). A catalog with no list is not
//! checked. Reasoning options are never refused: they are a hint, and coding agents send them to
//! every model.

use llmesh_proto::{
    common::v1::{ResponseFormatType, content_part::Kind},
    generation::v1::GenerateRequest,
};
use tonic::Status;

/// The capability names a catalog may list (`[generation.models.NAME.catalog] capabilities`).
pub const TOOLS: &str = "tools";
pub const IMAGES: &str = "images";
pub const DOCUMENTS: &str = "documents";
pub const JSON_SCHEMA: &str = "json_schema";

/// `Err` when `capabilities` is not empty and `request` needs one it does not hold.
pub fn check(request: &GenerateRequest, capabilities: &[String]) -> Result<(), Status> {
    if capabilities.is_empty() {
        return Ok(());
    }
    let Some((field, needed)) = first_need(request, |name| capabilities.iter().any(|c| c == name)) else {
        return Ok(());
    };
    Err(Status::invalid_argument(format!(
        "{field}: model {} does not take {needed} (its capabilities: {})",
        request.model,
        capabilities.join(", ")
    )))
}

/// The first field of `request` that needs a capability `has` says the model lacks, and that
/// capability's name.
fn first_need(request: &GenerateRequest, has: impl Fn(&str) -> bool) -> Option<(String, &'static str)> {
    if !request.tools.is_empty() && !has(TOOLS) {
        return Some(("tools".into(), TOOLS));
    }
    let schema = request.response_format.as_ref().is_some_and(|f| f.r#type() == ResponseFormatType::JsonSchema);
    if schema && !has(JSON_SCHEMA) {
        return Some(("response_format".into(), JSON_SCHEMA));
    }
    for (m, message) in request.messages.iter().enumerate() {
        for (p, part) in message.parts.iter().enumerate() {
            let needed = match part.kind {
                Some(Kind::Image(_)) => IMAGES,
                Some(Kind::Document(_)) => DOCUMENTS,
                Some(Kind::Text(_)) | None => continue,
            };
            if !has(needed) {
                return Some((format!("messages[{m}].parts[{p}]"), needed));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use llmesh_proto::common::v1::{ChatMessage, ContentPart, Image, ResponseFormat, Tool, image::Source};

    use super::*;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn image_request() -> GenerateRequest {
        let image = ContentPart {
            kind: Some(Kind::Image(Image {
                source: Some(Source::Url("https://example.com/a.png".into())),
                ..Default::default()
            })),
            ..Default::default()
        };
        let text = ContentPart { kind: Some(Kind::Text("what is this?".into())), ..Default::default() };
        GenerateRequest {
            model: "small".into(),
            messages: vec![ChatMessage { role: "user".into(), parts: vec![text, image], ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn a_request_needing_what_the_catalog_does_not_list_is_refused_naming_the_field() {
        let status = check(&image_request(), &caps(&["tools"])).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "messages[0].parts[1]: model small does not take images (its capabilities: tools)"
        );

        let tools =
            GenerateRequest { tools: vec![Tool { name: "Bash".into(), ..Default::default() }], ..image_request() };
        let status = check(&tools, &caps(&["images"])).unwrap_err();
        assert!(status.message().starts_with("tools: model small does not take tools"), "{status:?}");

        let format = ResponseFormat { r#type: ResponseFormatType::JsonSchema.into(), ..Default::default() };
        let schema = GenerateRequest { response_format: Some(format), ..GenerateRequest::default() };
        let status = check(&schema, &caps(&["tools"])).unwrap_err();
        assert!(status.message().starts_with("response_format: model  does not take json_schema"), "{status:?}");
    }

    #[test]
    fn what_the_catalog_lists_or_an_empty_list_passes() {
        assert!(check(&image_request(), &caps(&["images"])).is_ok());
        assert!(check(&image_request(), &[]).is_ok());
        let json_object = ResponseFormat { r#type: ResponseFormatType::JsonObject.into(), ..Default::default() };
        let plain = GenerateRequest { response_format: Some(json_object), ..GenerateRequest::default() };
        assert!(check(&plain, &caps(&["tools"])).is_ok());
    }
}
