//! OCI names a requester checks before sending: the distribution spec's repository
//! grammar and a registry host with an optional port.

/// A host name, IPv4 or bracketed IPv6 literal, with an optional `:port`.
pub(crate) fn is_registry(s: &str) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match port {
            "" => return true,
            _ => match port.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    let host_ok = s.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    port_ok && host_ok
}

/// The OCI distribution-spec repository name grammar, at most 255 bytes.
pub(crate) fn is_repository(s: &str) -> bool {
    s.len() <= 255 && s.split('/').all(is_path_component)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(component: &str) -> bool {
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && is_alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[sep_start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_grammar() {
        for ok in [
            "docker.io",
            "registry.example.com",
            "localhost:5000",
            "10.0.0.1:443",
            "[::1]:5000",
            "[fe80::1]",
            "my-registry",
        ] {
            assert!(is_registry(ok), "{ok}");
        }
        for bad in [
            "",
            ":5000",
            "docker.io:",
            "docker.io:0",
            "docker.io:99999",
            "-bad.io",
            "a..b",
            "https://docker.io",
            "docker.io/library",
            "[::1",
            "[zz]:1",
            "host:12a",
        ] {
            assert!(!is_registry(bad), "{bad}");
        }
    }

    #[test]
    fn repository_grammar() {
        for ok in ["library/nginx", "a", "a.b_c__d---e/f0", "x/y/z"] {
            assert!(is_repository(ok), "{ok}");
        }
        for bad in [
            "",
            "Library/nginx",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a___b",
            "a.-b",
            "-a",
            "a_",
            &"a".repeat(256),
        ] {
            assert!(!is_repository(bad), "{bad}");
        }
    }
}
