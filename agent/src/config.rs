//! Registry credentials: a docker `config.json` (`--credentials`, the shape a Kubernetes
//! `dockerconfigjson` secret mounts) per registry, else `AGENT_ORIGIN_AUTH`
//! (`user:password`) for every registry. Never from the command line, never logged.
//!
//! An entry gives `auth` (base64 `user:password`), `username` and `password`, an
//! `identitytoken` (sent as the password at the registry's token endpoint, as `docker
//! login` with a token does) or a `registrytoken` (sent as the bearer token itself). Its
//! key is a registry as Docker writes it: `https://index.docker.io/v1/`, `docker.io`,
//! `host:port`, `https://host/v2/`.

use std::{collections::HashMap, fmt, path::Path};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::upstream::registry_name;

/// What this node presents to one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
    },
    /// A registry token, sent as `Authorization: Bearer`.
    Token(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

impl Credential {
    /// `oci-client`'s form.
    pub fn auth(&self) -> RegistryAuth {
        match self {
            Credential::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credential::Token(token) => RegistryAuth::Bearer(token.clone()),
        }
    }

    /// The form a please_pull delegates: `user:password`, or `Bearer TOKEN`.
    pub fn delegated(&self) -> String {
        match self {
            Credential::Basic { username, password } => format!("{username}:{password}"),
            Credential::Token(token) => format!("Bearer {token}"),
        }
    }

    /// A delegated credential as [`Credential::delegated`] writes it, or `Basic BASE64`;
    /// `None` when it is neither.
    pub fn from_delegated(text: &str) -> Option<Credential> {
        if let Some(token) = text.strip_prefix("Bearer ") {
            return (!token.is_empty()).then(|| Credential::Token(token.to_owned()));
        }
        let pair = match text.strip_prefix("Basic ") {
            Some(encoded) => decode_pair(encoded)?,
            None => text.to_owned(),
        };
        let (username, password) = pair.split_once(':')?;
        Some(Credential::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }
}

/// Standard base64 (padding optional) of `user:password`.
fn decode_pair(encoded: &str) -> Option<String> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(encoded.trim()).ok()?;
    String::from_utf8(bytes).ok().filter(|p| p.contains(':'))
}

/// The credentials per registry, and the one for every other registry.
#[derive(Default)]
pub struct Credentials {
    per_registry: HashMap<String, Credential>,
    fallback: Option<Credential>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("registries", &self.per_registry.keys().collect::<Vec<_>>())
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
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

/// Why the credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the credentials file: {0}")]
    Read(#[from] std::io::Error),
    #[error("the credentials file is not a docker config.json: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the credentials of {0} are neither base64 user:password, username and password, nor a token")]
    Entry(String),
    #[error("{0:?} in the credentials file names no registry")]
    Registry(String),
}

impl Credentials {
    /// From `file`, if given, and the environment. A file that does not exist (a secret
    /// not mounted) means no credentials from it, with one warning.
    pub fn load(file: Option<&Path>) -> Result<Self, CredentialsError> {
        let mut credentials = match file.map(std::fs::read) {
            Some(Ok(json)) => Credentials::parse(&json)?,
            Some(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    file = %file.unwrap_or(Path::new("")).display(),
                    "the credentials file does not exist: pulling anonymously"
                );
                Credentials::default()
            }
            Some(Err(error)) => return Err(error.into()),
            None => Credentials::default(),
        };
        credentials.fallback = std::env::var("AGENT_ORIGIN_AUTH")
            .ok()
            .and_then(|c| Credential::from_delegated(&c));
        Ok(credentials)
    }

    /// A docker config.json's `auths`.
    pub fn parse(json: &[u8]) -> Result<Self, CredentialsError> {
        let config: DockerConfig = serde_json::from_slice(json)?;
        let mut per_registry = HashMap::new();
        for (key, entry) in config.auths {
            let from_auth = entry.auth.as_deref().filter(|a| !a.is_empty()).map(|a| {
                decode_pair(a)
                    .and_then(|pair| Credential::from_delegated(&pair))
                    .ok_or_else(|| CredentialsError::Entry(key.clone()))
            });
            let from_auth = from_auth.transpose()?;
            let username = entry.username.clone().or_else(|| match &from_auth {
                Some(Credential::Basic { username, .. }) => Some(username.clone()),
                _ => None,
            });
            let credential = if let Some(token) = entry.registrytoken.filter(|t| !t.is_empty()) {
                Credential::Token(token)
            } else if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Credential::Basic {
                    username: username.unwrap_or_else(|| "<token>".into()),
                    password: token,
                }
            } else if let (Some(username), Some(password)) = (&entry.username, entry.password) {
                Credential::Basic {
                    username: username.clone(),
                    password,
                }
            } else {
                from_auth.ok_or_else(|| CredentialsError::Entry(key.clone()))?
            };
            let registry = registry_of_key(&key).ok_or(CredentialsError::Registry(key))?;
            per_registry.insert(registry, credential);
        }
        Ok(Credentials {
            per_registry,
            fallback: None,
        })
    }

    /// The credential for a registry by its name (`docker.io`, `host:port`).
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        registry_name(registry)
            .and_then(|name| self.per_registry.get(&name))
            .or(self.fallback.as_ref())
    }
}

/// The registry a config.json key names: a URL (`https://index.docker.io/v1/`) or a
/// bare `host[:port][/path]`.
fn registry_of_key(key: &str) -> Option<String> {
    let bare = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    registry_name(bare.split('/').next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(username: &str, password: &str) -> Credential {
        Credential::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    #[test]
    fn a_dockerconfigjson_gives_credentials_per_registry_and_hides_them() {
        let json = br#"{"auths": {
            "registry.example.com": {"auth": "dXNlcjpwYXNz"},
            "https://other.example.com:5000/v2/": {"username": "u", "password": "p:w"},
            "https://index.docker.io/v1/": {"auth": "aHViOmh1Yi1wYXNz"},
            "acr.example.io": {"auth": "MDAwMDAwMDAtMDAwMDAwMDA6", "identitytoken": "refresh"},
            "ghcr.example.io": {"registrytoken": "bearer-token"},
            "Quay.Example.io": {"auth": "cTpwPQ"}
        }}"#;
        let credentials = Credentials::parse(json).unwrap();
        assert_eq!(
            credentials.get("registry.example.com"),
            Some(&basic("user", "pass"))
        );
        assert_eq!(
            credentials.get("other.example.com:5000"),
            Some(&basic("u", "p:w"))
        );
        // Docker Hub under each of its names.
        for name in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(credentials.get(name), Some(&basic("hub", "hub-pass")));
        }
        // An identity token goes as the password, with the entry's user.
        assert_eq!(
            credentials.get("acr.example.io"),
            Some(&basic("00000000-00000000", "refresh"))
        );
        assert_eq!(
            credentials.get("ghcr.example.io"),
            Some(&Credential::Token("bearer-token".into()))
        );
        // Unpadded base64, a key in capitals.
        assert_eq!(credentials.get("quay.example.io"), Some(&basic("q", "p=")));
        assert_eq!(credentials.get("third.example.com"), None);
        let shown = format!("{credentials:?} {:?}", credentials.get("docker.io"));
        for secret in ["pass", "p:w", "refresh", "bearer-token"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        for bad in [
            &br#"{"auths": {"x": {"auth": "!!"}}}"#[..],
            br#"{"auths": {"x": {"auth": "bm9jb2xvbg=="}}}"#,
            br#"{"auths": {"x": {"username": "only"}}}"#,
        ] {
            assert!(
                matches!(Credentials::parse(bad), Err(CredentialsError::Entry(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            Credentials::parse(br#"{"auths": {"not a host": {"auth": "dXNlcjpwYXNz"}}}"#),
            Err(CredentialsError::Registry(_))
        ));
        assert!(matches!(
            Credentials::parse(b"{\"auths\": 1}"),
            Err(CredentialsError::Parse(_))
        ));
    }

    #[test]
    fn a_delegated_credential_reads_back_as_it_was_written() {
        for credential in [basic("u", "p:w"), Credential::Token("t".into())] {
            assert_eq!(
                Credential::from_delegated(&credential.delegated()),
                Some(credential)
            );
        }
        assert_eq!(
            Credential::from_delegated("Basic dXNlcjpwYXNz"),
            Some(basic("user", "pass"))
        );
        assert_eq!(Credential::from_delegated("no-colon"), None);
        assert_eq!(Credential::from_delegated("Bearer "), None);
        assert_eq!(Credential::from_delegated("Basic !!"), None);
    }

    #[test]
    fn a_missing_credentials_file_means_anonymous() {
        let missing = std::env::temp_dir().join("gantry-no-such-credentials.json");
        let credentials = Credentials::load(Some(&missing)).unwrap();
        assert!(credentials.per_registry.is_empty());
        let dir = std::env::temp_dir().join(format!("gantry-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A directory where the file should be is an error, not anonymity.
        assert!(matches!(
            Credentials::load(Some(&dir)),
            Err(CredentialsError::Read(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
