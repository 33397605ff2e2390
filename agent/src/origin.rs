//! Pulls from the origin registry over the distribution API, through `oci-client`.

use futures::StreamExt;
use gantry_coord::{Digest, FailureClass, OriginRefKind};
use oci_client::{
    client::{ClientConfig, ClientProtocol},
    errors::OciDistributionError,
    secrets::RegistryAuth,
    Client, Reference,
};

use crate::{
    store::{BlobDir, BlobWriter, StoreError},
    MAX_BLOB,
};

/// The manifest media types asked for: OCI and Docker, image and index.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Debug, Clone)]
pub struct Origin {
    /// `host:port`, as image references name a registry.
    pub registry: String,
}

/// `user:password` as the environment gives it.
pub fn basic_auth(credentials: Option<&str>) -> RegistryAuth {
    match credentials.and_then(|c| c.split_once(':')) {
        Some((user, password)) => RegistryAuth::Basic(user.to_owned(), password.to_owned()),
        None => RegistryAuth::Anonymous,
    }
}

/// Why an origin pull failed, with the class every node would see.
#[derive(Debug, thiserror::Error)]
#[error("{class:?}: {message}")]
pub struct OriginError {
    pub class: FailureClass,
    pub message: String,
}

impl From<StoreError> for OriginError {
    fn from(error: StoreError) -> Self {
        OriginError {
            class: FailureClass::Transient,
            message: error.to_string(),
        }
    }
}

fn classify(error: OciDistributionError) -> OriginError {
    use OciDistributionError as E;
    let class = match &error {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => FailureClass::Auth,
        E::ImageManifestNotFoundError(_) => FailureClass::NotFound,
        E::ServerError {
            code: 401 | 403, ..
        } => FailureClass::Auth,
        E::ServerError { code: 404, .. } => FailureClass::NotFound,
        E::ServerError { code: 429, .. } => FailureClass::RateLimited,
        E::RegistryError { envelope, .. } => {
            use oci_client::errors::OciErrorCode as C;
            let has = |codes: &[C]| envelope.errors.iter().any(|e| codes.contains(&e.code));
            if has(&[
                C::BlobUnknown,
                C::ManifestUnknown,
                C::NameUnknown,
                C::NotFound,
            ]) {
                FailureClass::NotFound
            } else if has(&[C::Unauthorized, C::Denied]) {
                FailureClass::Auth
            } else if has(&[C::Toomanyrequests]) {
                FailureClass::RateLimited
            } else {
                FailureClass::Transient
            }
        }
        _ => FailureClass::Transient,
    };
    OriginError {
        class,
        message: error.to_string(),
    }
}

impl Origin {
    /// `url` is `http://HOST:PORT`.
    pub fn new(url: &str) -> Result<Self, String> {
        let registry = url
            .strip_prefix("http://")
            .ok_or("--origin must be http://HOST:PORT")?
            .trim_end_matches('/')
            .to_owned();
        Ok(Origin { registry })
    }

    /// Pulls `digest` of `repository` into `store`; returns its length.
    pub async fn pull(
        &self,
        repository: &str,
        digest: &Digest,
        kind: OriginRefKind,
        auth: &RegistryAuth,
        store: &BlobDir,
    ) -> Result<u64, OriginError> {
        let reference = Reference::with_digest(
            self.registry.clone(),
            repository.to_owned(),
            digest.to_string(),
        );
        // A client per pull: `oci-client` keeps credentials per registry, and delegated
        // ones serve this pull only.
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        if kind == OriginRefKind::Manifest {
            let (bytes, _) = client
                .pull_manifest_raw(&reference, auth, MANIFEST_TYPES)
                .await
                .map_err(classify)?;
            let Some(mut writer) = writer(store, digest, Some(bytes.len() as u64)).await? else {
                return settled(store, digest).await;
            };
            writer.write(&bytes).await?;
            return Ok(writer.finish().await?);
        }
        client
            .auth(&reference, auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(classify)?;
        let mut stream = client
            .pull_blob_stream(&reference, digest.encode().as_str())
            .await
            .map_err(classify)?;
        // Pieces are published as they arrive when the length is known up front, which
        // the distribution API requires of a blob response.
        let len = stream.content_length.filter(|len| *len <= MAX_BLOB);
        let Some(mut writer) = writer(store, digest, len).await? else {
            return settled(store, digest).await;
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| OriginError {
                class: FailureClass::Transient,
                message: e.to_string(),
            })?;
            writer.write(&chunk).await?;
        }
        Ok(writer.finish().await?)
    }
}

/// A writer for the pull, or `None` when another writer on this node (a fetch from a
/// member) has the blob under way.
async fn writer(
    store: &BlobDir,
    digest: &Digest,
    len: Option<u64>,
) -> Result<Option<BlobWriter>, OriginError> {
    match store.writer(digest, len, MAX_BLOB).await {
        Ok(writer) => Ok(Some(writer)),
        Err(StoreError::Busy) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// The outcome of the other writer, as this pull's.
async fn settled(store: &BlobDir, digest: &Digest) -> Result<u64, OriginError> {
    if store.settled(digest).await {
        Ok(std::fs::metadata(store.path(digest)).map_or(0, |m| m.len()))
    } else {
        Err(OriginError {
            class: FailureClass::Transient,
            message: "the fetch this node had under way failed".into(),
        })
    }
}
