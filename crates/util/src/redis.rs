//! Redis URLs as every Redis client of the mesh reads them (the cache store and its change feed,
//! the rate limiters, the job queue, health's probe), so that one URL works everywhere:
//!
//! ```text
//! redis://[user:password@]host:port/db                  plaintext (a password: Redis ACL / AUTH)
//! rediss://[user:password@]host:port/db                 TLS, the server checked against the system's roots
//! rediss://...?tls_ca=/etc/llmesh/tls/ca.crt            TLS, the server checked against this CA instead
//!   [&tls_cert=/path/client.crt&tls_key=/path/client.key] and a client certificate (tls-auth-clients yes)
//! redis[s]://user@host:port/db?password_file=/path     the password read from a file (a mounted Secret),
//!                                                       so that it is in no configuration file or variable
//! ```
//!
//! The files are read when the client is made (start-up); a file that cannot be read is an error
//! naming it (the path, not the URL: the URL may hold a password). Naming `tls_*` files on a
//! `redis://` URL is an error too: a CA on a plaintext connection protects nothing. TLS is rustls
//! over aws-lc-rs, the tree's one provider.

use std::path::Path;

use redis::{ErrorKind, IntoConnectionInfo as _, RedisError, RedisResult, TlsCertificates};

/// A client for `url` (see the module's documentation for the URL's forms).
pub fn client(url: &str) -> RedisResult<redis::Client> {
    let mut info = url.into_connection_info()?;
    if let Some(password) = password(url)? {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    match tls_certificates(url)? {
        Some(certificates) => redis::Client::build_with_tls(info, certificates),
        None => redis::Client::open(info),
    }
}

/// The password of `url`'s `password_file`, if it names one (trimmed of a final newline). For a
/// cluster: give it to `ClusterClientBuilder::password`.
pub fn password(url: &str) -> RedisResult<Option<String>> {
    let Some(parsed) = redis::parse_redis_url(url) else {
        return Err(invalid("not a Redis URL", String::new()));
    };
    let Some(path) = parsed.query_pairs().find(|(name, _)| name == "password_file").map(|(_, path)| path.into_owned())
    else {
        return Ok(None);
    };
    if parsed.password().is_some() {
        return Err(invalid("a Redis URL holds a password and a password_file", "keep one".into()));
    }
    let bytes = read(&path, "password_file")?;
    let text = String::from_utf8(bytes)
        .map_err(|_| invalid("the Redis password file is not UTF-8", format!("password_file {path}")))?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(invalid("the Redis password file is empty", format!("password_file {path}")));
    }
    Ok(Some(password.to_owned()))
}

/// The CA and client certificate a `rediss://` URL names, or `None` when it names none. For a
/// cluster: give them to `ClusterClientBuilder::certs` (every node's URL names the same files).
pub fn tls_certificates(url: &str) -> RedisResult<Option<TlsCertificates>> {
    let Some(parsed) = redis::parse_redis_url(url) else {
        return Err(invalid("not a Redis URL", String::new()));
    };
    let mut ca = None;
    let mut cert = None;
    let mut key = None;
    for (name, value) in parsed.query_pairs() {
        match name.as_ref() {
            "tls_ca" => ca = Some(value.into_owned()),
            "tls_cert" => cert = Some(value.into_owned()),
            "tls_key" => key = Some(value.into_owned()),
            _ => {}
        }
    }
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    if !matches!(parsed.scheme(), "rediss" | "valkeys") {
        return Err(invalid(
            "tls_ca, tls_cert and tls_key need a rediss:// URL",
            format!("{} is plaintext", parsed.scheme()),
        ));
    }
    let client_tls = match (cert, key) {
        (Some(cert), Some(key)) => {
            Some(redis::ClientTlsConfig { client_cert: read(&cert, "tls_cert")?, client_key: read(&key, "tls_key")? })
        }
        (None, None) => None,
        _ => return Err(invalid("tls_cert and tls_key go together", "one of them is missing".into())),
    };
    let root_cert = ca.map(|ca| read(&ca, "tls_ca")).transpose()?;
    Ok(Some(TlsCertificates { client_tls, root_cert }))
}

fn read(path: &str, parameter: &str) -> RedisResult<Vec<u8>> {
    std::fs::read(Path::new(path))
        .map_err(|error| invalid("cannot read a TLS file of the Redis URL", format!("{parameter} {path}: {error}")))
}

fn invalid(description: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, description, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_need_no_certificates() {
        assert!(tls_certificates("redis://127.0.0.1:6379/0").unwrap().is_none());
        assert!(tls_certificates("redis://user:secret@redis:6379/0").unwrap().is_none());
        assert!(tls_certificates("rediss://redis:6379/0").unwrap().is_none());
        assert!(client("redis://user:secret@redis:6379/0").is_ok());
        assert!(client("rediss://redis:6379/0").is_ok(), "rediss:// needs the TLS feature");
    }

    #[test]
    fn a_password_file_gives_the_password() {
        let dir = std::env::temp_dir().join(format!("llmesh-redis-password-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "from-a-secret\n").unwrap();
        let url = format!("redis://llmesh@redis:6379/0?password_file={}", file.display());
        assert_eq!(password(&url).unwrap().as_deref(), Some("from-a-secret"));
        let client = client(&url).unwrap();
        assert_eq!(client.get_connection_info().redis_settings().password(), Some("from-a-secret"));
        assert_eq!(client.get_connection_info().redis_settings().username(), Some("llmesh"));
        assert!(password("redis://redis:6379/0").unwrap().is_none());

        let both = format!("redis://llmesh:inline@redis:6379/0?password_file={}", file.display());
        assert!(password(&both).unwrap_err().to_string().contains("keep one"));
        std::fs::write(&file, "\n").unwrap();
        assert!(password(&url).unwrap_err().to_string().contains("empty"));
        let missing = dir.join("missing");
        let error = password(&format!("redis://redis?password_file={}", missing.display())).unwrap_err();
        assert!(error.to_string().contains(&missing.display().to_string()), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn named_files_are_read_and_errors_name_them() {
        let dir = std::env::temp_dir().join(format!("llmesh-redis-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "ca bytes").unwrap();
        let url = format!("rediss://llmesh:secret@redis:6379/0?tls_ca={}", ca.display());
        let certificates = tls_certificates(&url).unwrap().unwrap();
        assert_eq!(certificates.root_cert.as_deref(), Some(&b"ca bytes"[..]));
        assert!(certificates.client_tls.is_none());

        let missing = dir.join("missing.pem");
        let error = tls_certificates(&format!("rediss://redis?tls_ca={}", missing.display())).unwrap_err();
        assert!(error.to_string().contains(&missing.display().to_string()), "{error}");
        assert!(!error.to_string().contains("secret"));

        let error = tls_certificates(&format!("redis://redis?tls_ca={}", ca.display())).unwrap_err();
        assert!(error.to_string().contains("rediss://"), "{error}");
        let error = tls_certificates(&format!("rediss://redis?tls_ca={0}&tls_cert={0}", ca.display())).unwrap_err();
        assert!(error.to_string().contains("go together"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
