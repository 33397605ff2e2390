//! Which registries this node pulls from, by the names containerd gives them.
//!
//! containerd names a registry in `?ns=` by its host as the image reference spells it
//! (`docker.io`, `ghcr.io`, `registry.example.com:5000`); please_pull carries the same
//! name. An upstream says where that registry's API is: `https://host[:port][/prefix]`
//! (the prefix goes before `/v2/`, as containerd's hosts.toml and the Go agent read it, for
//! pull-through caches such as Nexus or Artifactory), `http://` for labs, and
//! `NAME=URL` when a cache answers for another registry's name.

use std::fmt;

/// Docker Hub's name in image references, `ns` and please_pull.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's distribution API is.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// One registry and where its API is reached.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The registry's canonical name: a lowercase `host[:port]`, `docker.io` for Docker
    /// Hub.
    pub name: String,
    /// `https`, or plain `http` (labs).
    pub tls: bool,
    /// `host[:port]` and the path prefix before `/v2/`, without a trailing slash.
    pub endpoint: String,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.url())
    }
}

/// Why an `--origin` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("{0:?}: an upstream is https://HOST[:PORT][/PREFIX], http://HOST:PORT, NAME=URL or _default")]
    Scheme(String),
    #[error("{0:?} is not a registry host (a host name or IP literal, optionally :port)")]
    Host(String),
    #[error("{0:?}: the path prefix may hold only letters, digits and ._-/")]
    Prefix(String),
    #[error("no upstream: give --origin at least once")]
    None,
    #[error("_default cannot be combined with listed upstreams")]
    Mixed,
}

impl Upstream {
    /// `[NAME=]https://HOST[:PORT][/PREFIX]` or `[NAME=]http://HOST[:PORT][/PREFIX]`.
    pub fn parse(spec: &str) -> Result<Upstream, UpstreamError> {
        let (name, url) = match spec.split_once('=') {
            Some((name, url)) => (Some(name), url),
            None => (None, spec),
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(UpstreamError::Scheme(spec.to_owned()));
        };
        let rest = rest.trim_end_matches('/');
        let (host, prefix) = match rest.split_once('/') {
            Some((host, prefix)) => (host, Some(prefix)),
            None => (rest, None),
        };
        let host = canonical_host(host).ok_or_else(|| UpstreamError::Host(host.to_owned()))?;
        if let Some(prefix) = prefix {
            let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
            if prefix.is_empty() || !prefix.chars().all(fits) || prefix.contains("//") {
                return Err(UpstreamError::Prefix(prefix.to_owned()));
            }
        }
        let name = match name {
            Some(name) => registry_name(name).ok_or_else(|| UpstreamError::Host(name.into()))?,
            None => registry_name(&host).ok_or_else(|| UpstreamError::Host(host.clone()))?,
        };
        let endpoint = match prefix {
            Some(prefix) => format!("{host}/{prefix}"),
            None => host,
        };
        Ok(Upstream {
            name,
            tls,
            endpoint,
        })
    }

    /// A registry reached by its own name over HTTPS (Docker Hub at its API host).
    pub fn of_registry(name: &str) -> Option<Upstream> {
        let name = registry_name(name)?;
        let endpoint = if name == DOCKER_HUB {
            DOCKER_HUB_API.to_owned()
        } else {
            name.clone()
        };
        Some(Upstream {
            name,
            tls: true,
            endpoint,
        })
    }

    /// The API root without `/v2/`, e.g. `https://registry-1.docker.io`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.endpoint)
    }
}

/// A registry name as image references, `ns` and docker's config.json spell it, made
/// canonical: lowercase, Docker Hub's aliases as `docker.io`; `None` if it is no host.
pub fn registry_name(name: &str) -> Option<String> {
    let host = canonical_host(name)?;
    Some(match host.as_str() {
        "index.docker.io" | DOCKER_HUB_API => DOCKER_HUB.to_owned(),
        _ => host,
    })
}

/// A host name or IP literal (`[::1]` for IPv6), with an optional port, lowercased.
fn canonical_host(text: &str) -> Option<String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        ip.parse::<std::net::Ipv6Addr>().ok()?;
        (&text[..ip.len() + 2], after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if let Some(port) = port {
        port.parse::<u16>().ok().filter(|p| *p != 0)?;
    }
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !host.starts_with('[')
        && (host.is_empty() || host.len() > 253 || !host.split('.').all(label))
    {
        return None;
    }
    Some(text.to_ascii_lowercase())
}

/// The registries this node mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstreams {
    /// The upstreams named with `--origin`, first the `--image`'s.
    Listed(Vec<Upstream>),
    /// `--origin _default`: every registry by its own name over HTTPS, only those in
    /// `allow` when it is not empty.
    Every { allow: Vec<String> },
}

/// The `--origin` value that mirrors every registry by its name.
pub const EVERY_REGISTRY: &str = "_default";

impl Upstreams {
    /// From the `--origin` values and the `--allow-registry` values.
    pub fn new(origins: &[String], allow: &[String]) -> Result<Upstreams, UpstreamError> {
        let allow = allow
            .iter()
            .map(|name| registry_name(name).ok_or_else(|| UpstreamError::Host(name.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        if origins.iter().any(|o| o == EVERY_REGISTRY) {
            if origins.len() > 1 {
                return Err(UpstreamError::Mixed);
            }
            return Ok(Upstreams::Every { allow });
        }
        if origins.is_empty() {
            return Err(UpstreamError::None);
        }
        let mut listed = origins
            .iter()
            .map(|o| Upstream::parse(o))
            .collect::<Result<Vec<_>, _>>()?;
        if !allow.is_empty() {
            listed.retain(|u| allow.contains(&u.name));
        }
        Ok(Upstreams::Listed(listed))
    }

    /// Where the registry `name` is pulled from; `None` names the only upstream there is
    /// (containerd may leave `ns` out when a mirror serves one registry).
    pub fn resolve(&self, name: Option<&str>) -> Option<Upstream> {
        match (self, name) {
            (Upstreams::Listed(listed), None) if listed.len() == 1 => Some(listed[0].clone()),
            (_, None) => None,
            (Upstreams::Listed(listed), Some(name)) => {
                let name = registry_name(name)?;
                listed.iter().find(|u| u.name == name).cloned()
            }
            (Upstreams::Every { allow }, Some(name)) => {
                let upstream = Upstream::of_registry(name)?;
                (allow.is_empty() || allow.contains(&upstream.name)).then_some(upstream)
            }
        }
    }

    /// The first listed upstream: where an `--image` without a registry comes from.
    pub fn first(&self) -> Option<&Upstream> {
        match self {
            Upstreams::Listed(listed) => listed.first(),
            Upstreams::Every { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, tls: bool, endpoint: &str) -> Upstream {
        Upstream {
            name: name.into(),
            tls,
            endpoint: endpoint.into(),
        }
    }

    #[test]
    fn an_upstream_is_named_as_containerd_names_its_registry() {
        let parse = |s: &str| Upstream::parse(s);
        assert_eq!(
            parse("https://Registry.Example.com/"),
            Ok(upstream(
                "registry.example.com",
                true,
                "registry.example.com"
            ))
        );
        assert_eq!(
            parse("http://10.0.0.1:5000"),
            Ok(upstream("10.0.0.1:5000", false, "10.0.0.1:5000"))
        );
        assert_eq!(
            parse("https://registry-1.docker.io"),
            Ok(upstream("docker.io", true, "registry-1.docker.io"))
        );
        // A pull-through cache answering for Docker Hub, its API under a prefix.
        assert_eq!(
            parse("docker.io=https://nexus.example.com/repository/hub"),
            Ok(upstream(
                "docker.io",
                true,
                "nexus.example.com/repository/hub"
            ))
        );
        assert_eq!(
            parse("https://[::1]:5000"),
            Ok(upstream("[::1]:5000", true, "[::1]:5000"))
        );
        assert!(matches!(
            parse("registry.example.com"),
            Err(UpstreamError::Scheme(_))
        ));
        assert!(matches!(
            parse("ftp://registry.example.com"),
            Err(UpstreamError::Scheme(_))
        ));
        assert!(matches!(
            parse("https://bad_host"),
            Err(UpstreamError::Host(_))
        ));
        assert!(matches!(
            parse("https://host:0"),
            Err(UpstreamError::Host(_))
        ));
        assert!(matches!(
            parse("https://host:99999"),
            Err(UpstreamError::Host(_))
        ));
        assert!(matches!(
            parse("https://[zz]:1"),
            Err(UpstreamError::Host(_))
        ));
        assert!(matches!(
            parse("https://host/a b"),
            Err(UpstreamError::Prefix(_))
        ));
        assert!(matches!(
            parse("https://host/a//b"),
            Err(UpstreamError::Prefix(_))
        ));
        assert!(matches!(
            parse("x y=https://host"),
            Err(UpstreamError::Host(_))
        ));
        assert_eq!(
            parse("https://nexus.example.com/v2prefix").unwrap().url(),
            "https://nexus.example.com/v2prefix"
        );
    }

    #[test]
    fn docker_hub_has_one_name_and_its_api_host() {
        for alias in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "Docker.IO",
        ] {
            assert_eq!(registry_name(alias).as_deref(), Some(DOCKER_HUB), "{alias}");
        }
        let hub = Upstream::of_registry("docker.io").unwrap();
        assert_eq!(hub.url(), "https://registry-1.docker.io");
        assert_eq!(
            Upstream::of_registry("ghcr.io").unwrap().url(),
            "https://ghcr.io"
        );
        assert_eq!(Upstream::of_registry("not a host"), None);
    }

    #[test]
    fn an_ns_resolves_to_its_upstream_or_to_none() {
        let listed = Upstreams::new(
            &[
                "https://registry.example.com".into(),
                "https://ghcr.io".into(),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            listed.resolve(Some("ghcr.io")).unwrap().url(),
            "https://ghcr.io"
        );
        assert_eq!(listed.resolve(Some("quay.io")), None);
        // With two upstreams an ns is needed; with one it may be left out.
        assert_eq!(listed.resolve(None), None);
        let one = Upstreams::new(&["https://registry.example.com".into()], &[]).unwrap();
        assert_eq!(one.resolve(None).unwrap().name, "registry.example.com");
        assert_eq!(one.first().unwrap().name, "registry.example.com");

        let every = Upstreams::new(&[EVERY_REGISTRY.into()], &[]).unwrap();
        assert_eq!(
            every.resolve(Some("docker.io")).unwrap().url(),
            "https://registry-1.docker.io"
        );
        assert_eq!(
            every.resolve(Some("quay.io:443")).unwrap().url(),
            "https://quay.io:443"
        );
        assert_eq!(every.resolve(Some("bad host")), None);
        assert_eq!(every.resolve(None), None);
        assert_eq!(every.first(), None);

        let allowed =
            Upstreams::new(&[EVERY_REGISTRY.into()], &["index.docker.io".into()]).unwrap();
        assert!(allowed.resolve(Some("docker.io")).is_some());
        assert_eq!(allowed.resolve(Some("ghcr.io")), None);

        assert_eq!(
            Upstreams::new(&[EVERY_REGISTRY.into(), "https://ghcr.io".into()], &[]),
            Err(UpstreamError::Mixed)
        );
        assert_eq!(Upstreams::new(&[], &[]), Err(UpstreamError::None));
        assert!(Upstreams::new(&["https://ghcr.io".into()], &["bad host".into()]).is_err());
    }
}
