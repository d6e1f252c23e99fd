//! The routes, once for every dialect: read the body within the call's deadline, parse it in the
//! route's [`Dialect`], make the call (unary or streamed) on the gateway, and answer in the
//! dialect with the mesh's facts and the unmapped fields' names as response headers.

use http::{StatusCode, request::Parts};
use serde_json::{Value, json};
use tonic::body::Body;

use super::{
    Facts, Ingress, Problem,
    dialect::{Context, Dialect, Parsed},
    json_response, now_unix, sse,
};
use crate::{principal::Principal, service::Unary};

/// `POST` to `D`'s route.
pub async fn serve<D: Dialect>(ingress: &Ingress, parts: Parts, body: Body) -> Result<http::Response<Body>, Problem> {
    let deadline = ingress.deadline(&parts.headers)?;
    let cache = if D::CACHE_HEADER { Ingress::cache_policy(&parts.headers)? } else { 0 };
    let context = Context { cache, default_model: ingress.default_model(), max_objects: ingress.max_objects() };
    let Parsed { request, stream, options, unmapped } = D::parse(&ingress.body(body, deadline).await?, &context)?;
    let model = request.model.clone();
    let created = now_unix();
    if stream {
        let streamed = ingress
            .gateway()
            .stream(Principal::of(&parts.extensions), request, deadline)
            .await
            .map_err(|e| ingress.call_problem(e, Some(&model), deadline))?;
        let (first, chunks) = Ingress::first_chunk(streamed.chunks, deadline).await?;
        let mut headers = http::HeaderMap::new();
        let facts = Facts {
            id: &first.id,
            cached: first.cached,
            provider: &first.provider,
            degraded: first.degraded.as_ref(),
            quota: streamed.quota,
        };
        facts.write(&mut headers);
        unmapped.write(&mut headers, &first.provider);
        let events = D::events(&first, options, created);
        return Ok(sse::response(&first, chunks, events, deadline, headers));
    }
    let Unary { response, quota } = ingress
        .gateway()
        .unary(Principal::of(&parts.extensions), request, deadline, D::ROUTE)
        .await
        .map_err(|e| ingress.call_problem(e, Some(&model), deadline))?;
    let mut http = json_response(StatusCode::OK, &D::render(&response, &options, created));
    let facts = Facts {
        id: &response.id,
        cached: response.cached,
        provider: &response.provider,
        degraded: response.degraded.as_ref(),
        quota,
    };
    facts.write(http.headers_mut());
    unmapped.write(http.headers_mut(), &response.provider);
    Ok(http)
}

/// `GET /v1/models`: the models generation serves that the key may use, in OpenAI's list.
pub async fn models(ingress: &Ingress, parts: Parts) -> Result<http::Response<Body>, Problem> {
    let deadline = ingress.deadline(&parts.headers)?;
    let caller = Principal::of(&parts.extensions);
    let models = ingress
        .gateway()
        .models(caller, deadline)
        .await
        .map_err(|error| ingress.call_problem(error, None, deadline))?;
    let data: Vec<Value> = models
        .iter()
        .map(|model| json!({ "id": model.name, "object": "model", "created": 0, "owned_by": model.provider }))
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "object": "list", "data": data })))
}
