//! Where the generation replicas are: `http://host:port` entries as they are, and `dns://name:port`
//! entries re-resolved periodically (compose replicas, Kubernetes headless services), so replicas
//! come and go without a restart.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail};

use super::pool::Pool;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Static(String),
    Dns { host: String, port: u16 },
}

impl Source {
    pub fn parse(entry: &str) -> anyhow::Result<Self> {
        if let Some(rest) = entry.strip_prefix("dns://") {
            let (host, port) = rest.rsplit_once(':').with_context(|| format!("{entry:?}: dns:// needs host:port"))?;
            let port = port.trim_end_matches('/').parse().with_context(|| format!("{entry:?}: bad port"))?;
            return Ok(Self::Dns { host: host.to_string(), port });
        }
        if entry.starts_with("http://") || entry.starts_with("https://") {
            return Ok(Self::Static(entry.to_string()));
        }
        bail!("{entry:?}: a generation endpoint is http://host:port or dns://name:port")
    }
}

/// Every address the sources name now. A name that does not resolve contributes nothing (and is
/// logged); the others still count.
pub async fn resolve(sources: &[Source]) -> Vec<String> {
    let mut addrs = Vec::new();
    for source in sources {
        match source {
            Source::Static(uri) => addrs.push(uri.clone()),
            Source::Dns { host, port } => match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(found) => {
                    let mut found: Vec<String> = found.map(|a| format!("http://{a}")).collect();
                    found.sort();
                    addrs.extend(found);
                }
                Err(error) => tracing::warn!(%host, %error, "cannot resolve generation replicas"),
            },
        }
    }
    addrs.dedup();
    addrs
}

/// Re-resolves every `every` and updates the pool, for as long as the process runs. Static-only
/// configurations need no refresh.
pub fn keep_fresh(pool: Arc<Pool>, sources: Vec<Source>, every: Duration) {
    if sources.iter().all(|s| matches!(s, Source::Static(_))) {
        return;
    }
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let addrs = resolve(&sources).await;
            // A resolver hiccup that finds nothing keeps the replicas we had.
            if !addrs.is_empty() {
                pool.set(&addrs);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        assert_eq!(Source::parse("http://10.0.0.1:50052").unwrap(), Source::Static("http://10.0.0.1:50052".into()));
        assert_eq!(
            Source::parse("dns://generation:50052").unwrap(),
            Source::Dns { host: "generation".into(), port: 50052 }
        );
        assert!(Source::parse("generation:50052").is_err());
        assert!(Source::parse("dns://generation").is_err());
    }

    #[tokio::test]
    async fn resolves_names_to_every_address() {
        let addrs = resolve(&[Source::Dns { host: "localhost".into(), port: 50052 }]).await;
        assert!(addrs.iter().any(|a| a == "http://127.0.0.1:50052" || a == "http://[::1]:50052"), "{addrs:?}");
    }
}
