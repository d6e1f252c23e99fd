//! Admission of one generation call, the answer step's outermost layer: the request is valid, the
//! key may use the model, and its tokens per minute and spend budgets cover the most the call can
//! use ([`TokenAdmission::admit`]). An admitted call goes on as a [`Reserved`] question holding
//! both reservations, which the settlement below settles; a refused one never reaches the cache or
//! generation, and holds nothing.
//!
//! Here rather than among the HTTP admission layers because it needs the decoded request (its
//! model, prompt and `max_tokens`), which only a route has.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tower::{Layer, Service, ServiceExt as _};

use super::{Asked, Question, Reserved, settle::Settled};
use crate::{
    admission::{Admitted, TokenAdmission},
    error::CallError,
};

/// Admits each call; see the module docs.
#[derive(Debug, Clone)]
pub struct AdmitLayer {
    admission: Arc<TokenAdmission>,
}

impl AdmitLayer {
    pub fn new(admission: TokenAdmission) -> Self {
        Self { admission: Arc::new(admission) }
    }
}

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit { admission: self.admission.clone(), inner }
    }
}

#[derive(Debug, Clone)]
pub struct Admit<S> {
    admission: Arc<TokenAdmission>,
    inner: S,
}

impl<S> Service<Asked> for Admit<S>
where
    S: Service<Reserved, Response = Settled, Error = CallError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Settled;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Settled, CallError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, asked: Asked) -> Self::Future {
        let (admission, inner) = (self.admission.clone(), self.inner.clone());
        Box::pin(async move {
            let Asked { request, stream, deadline, caller } = asked;
            let Admitted { principal, request, tokens } = admission.admit(caller, request).await?;
            let question = Question::new(request, stream, deadline, principal);
            inner.oneshot(Reserved { question, tokens }).await
        })
    }
}
