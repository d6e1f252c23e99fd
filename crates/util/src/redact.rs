//! Secrets out of logs and error messages.

/// `url` fit to show: user information (`user:password@`) becomes `***@`, every query value and
/// the fragment `***`. Scheme, host, port and path stay, so that an operator can tell targets apart.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.find("://").map_or(("", url), |i| url.split_at(i + 3));
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let mut shown = String::with_capacity(url.len());
    shown.push_str(scheme);
    match authority.rfind('@') {
        Some(at) => {
            shown.push_str("***@");
            shown.push_str(&authority[at + 1..]);
        }
        None => shown.push_str(authority),
    }
    let (before_fragment, fragment) = tail.split_once('#').map_or((tail, None), |(a, b)| (a, Some(b)));
    let (path, query) = before_fragment.split_once('?').map_or((before_fragment, None), |(a, b)| (a, Some(b)));
    shown.push_str(path);
    if let Some(query) = query {
        shown.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) => format!("{name}=***"),
                None if param.is_empty() => String::new(),
                None => "***".to_string(),
            })
            .collect();
        shown.push_str(&params.join("&"));
    }
    if fragment.is_some() {
        shown.push_str("#***");
    }
    shown
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

    #[test]
    fn credentials_and_query_values_are_redacted() {
        for (url, shown) in [
            ("redis://user:hunter2@redis:6379/0", "redis://***@redis:6379/0"),
            ("redis://:hunter2@redis:6379", "redis://***@redis:6379"),
            ("rediss://redis:6379/0?password=hunter2&db=1", "rediss://redis:6379/0?password=***&db=***"),
            ("http://gateway:50051", "http://gateway:50051"),
            ("http://a:b@gateway:50051/x?token=hunter2#hunter2", "http://***@gateway:50051/x?token=***#***"),
            // An `@` after the authority is not user information.
            ("http://gateway:50051/path?mail=a@b", "http://gateway:50051/path?mail=***"),
            ("dns://generation:50052", "dns://generation:50052"),
            ("127.0.0.1:6379?hunter2", "127.0.0.1:6379?***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
