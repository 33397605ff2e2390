//! Registry credentials: a docker `config.json` (`--credentials`, the shape a Kubernetes
//! `dockerconfigjson` secret mounts) per registry host, else `AGENT_ORIGIN_AUTH`
//! (`user:password`) for every host. Never from the command line, never logged.

use std::{collections::HashMap, fmt, path::Path};

use serde::Deserialize;

/// `user:password` per registry host, and the one for every other host.
#[derive(Default)]
pub struct Credentials {
    per_host: HashMap<String, String>,
    fallback: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("hosts", &self.per_host.keys().collect::<Vec<_>>())
            .field("fallback", &self.fallback.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Why the credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the credentials file: {0}")]
    Read(#[from] std::io::Error),
    #[error("the credentials file is not a docker config.json: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the credentials of {0} are neither base64 user:password nor username and password")]
    Entry(String),
}

impl Credentials {
    /// From `file`, if given, and the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, CredentialsError> {
        let mut credentials = match file {
            Some(path) => Credentials::parse(&std::fs::read(path)?)?,
            None => Credentials::default(),
        };
        credentials.fallback = std::env::var("AGENT_ORIGIN_AUTH")
            .ok()
            .filter(|c| !c.is_empty());
        Ok(credentials)
    }

    /// A docker config.json's `auths`.
    pub fn parse(json: &[u8]) -> Result<Self, CredentialsError> {
        let config: DockerConfig = serde_json::from_slice(json)?;
        let mut per_host = HashMap::new();
        for (host, entry) in config.auths {
            let pair = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) => base64_decode(&auth)
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .filter(|pair| pair.contains(':')),
                (None, Some(user), Some(password)) => Some(format!("{user}:{password}")),
                _ => None,
            };
            let pair = pair.ok_or_else(|| CredentialsError::Entry(host.clone()))?;
            // Keys may be URLs (`https://host/v1/`) or bare hosts.
            let host = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            per_host.insert(host, pair);
        }
        Ok(Credentials {
            per_host,
            fallback: None,
        })
    }

    /// `user:password` for a registry host (`host[:port]`).
    pub fn get(&self, registry: &str) -> Option<&str> {
        self.per_host
            .get(registry)
            .or(self.fallback.as_ref())
            .map(String::as_str)
    }
}

/// Standard base64, padding optional.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim().trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &c in bytes {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dockerconfigjson_gives_credentials_per_host_and_hides_them() {
        let json = br#"{"auths": {
            "registry.example.com": {"auth": "dXNlcjpwYXNz"},
            "https://other.example.com:5000/v2/": {"username": "u", "password": "p:w"}
        }}"#;
        let credentials = Credentials::parse(json).unwrap();
        assert_eq!(credentials.get("registry.example.com"), Some("user:pass"));
        assert_eq!(credentials.get("other.example.com:5000"), Some("u:p:w"));
        assert_eq!(credentials.get("third.example.com"), None);
        let shown = format!("{credentials:?}");
        assert!(!shown.contains("pass") && !shown.contains("p:w"), "{shown}");
        assert!(matches!(
            Credentials::parse(br#"{"auths": {"x": {"auth": "!!"}}}"#),
            Err(CredentialsError::Entry(_))
        ));
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
    }
}
