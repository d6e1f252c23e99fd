//! Secrets out of logs and error messages.

/// The URL with any password (anything before `@` after the scheme) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact_url("redis://:secret@host:6379/0"), "redis://***@host:6379/0");
        assert_eq!(redact_url("redis://user:secret@host:6379"), "redis://***@host:6379");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
