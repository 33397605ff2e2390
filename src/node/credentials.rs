//! Which credentials each origin pull used, and which ones the origin refused: an auth
//! failure is about the credentials, not the blob. Credentials are kept only as keyed
//! hashes, under a key drawn at random per node, so nothing kept here can be compared
//! across nodes or reversed into the secret.

use hashlink::LruCache;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use crate::{Authorization, Digest, FailureClass};

/// Refused credentials remembered per digest; past that, any others count as refused
/// too, so a peer cannot make this node pull again and again with made-up ones.
const REFUSED_PER_DIGEST: usize = 8;

/// A keyed hash of one set of credentials, or of none.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint([u8; 16]);

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

/// The credentials of in-flight pulls and those the origin refused, per digest.
pub(crate) struct CredentialLedger {
    key: [u8; 32],
    entries: Mutex<Entries>,
}

struct Entries {
    pulling: LruCache<Digest, Fingerprint>,
    refused: LruCache<Digest, Vec<Fingerprint>>,
}

impl CredentialLedger {
    /// A ledger of at most `capacity` digests in each of its two tables.
    pub(crate) fn new(capacity: usize) -> Self {
        CredentialLedger {
            key: random_key(),
            entries: Mutex::new(Entries {
                pulling: LruCache::new(capacity.max(1)),
                refused: LruCache::new(capacity.max(1)),
            }),
        }
    }

    pub(crate) fn fingerprint(&self, authorization: Option<&Authorization>) -> Fingerprint {
        let mut hash = Sha256::new();
        hash.update(self.key);
        match authorization {
            // "None" is one set of credentials like any other.
            None => hash.update([0u8]),
            Some(auth) => {
                hash.update([1u8]);
                hash.update(auth.expose_secret().as_bytes());
            }
        }
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&hash.finalize()[..16]);
        Fingerprint(fingerprint)
    }

    /// An origin pull of `digest` started with these credentials.
    pub(crate) fn started(&self, digest: &Digest, credentials: Fingerprint) {
        self.entries.lock().pulling.insert(*digest, credentials);
    }

    /// The origin pull of `digest` ended: an auth failure marks its credentials refused,
    /// a success forgets every refusal.
    pub(crate) fn finished(&self, digest: &Digest, result: Result<(), FailureClass>) {
        let mut entries = self.entries.lock();
        let used = entries.pulling.remove(digest);
        match result {
            Ok(()) => {
                entries.refused.remove(digest);
            }
            Err(FailureClass::Auth) => {
                let Some(used) = used else { return };
                match entries.refused.get_mut(digest) {
                    Some(refused) => {
                        if !refused.contains(&used) && refused.len() < REFUSED_PER_DIGEST {
                            refused.push(used);
                        }
                    }
                    None => {
                        entries.refused.insert(*digest, vec![used]);
                    }
                }
            }
            Err(_) => {}
        }
    }

    /// Whether an auth failure of `digest` holds for these credentials: they were
    /// refused, the ledger does not know which were (an entry it never saw, or one it
    /// dropped), or too many others were tried already.
    pub(crate) fn refused(&self, digest: &Digest, credentials: Fingerprint) -> bool {
        match self.entries.lock().refused.get(digest) {
            Some(refused) => refused.contains(&credentials) || refused.len() >= REFUSED_PER_DIGEST,
            None => true,
        }
    }
}

impl std::fmt::Debug for CredentialLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialLedger").finish_non_exhaustive()
    }
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    if getrandom::fill(&mut key).is_err() {
        // No OS randomness: the standard library's per-process random hasher keys.
        use std::hash::{BuildHasher, RandomState};
        for (i, chunk) in key.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap()
    }

    #[test]
    fn refused_credentials_are_remembered_and_others_are_not() {
        let ledger = CredentialLedger::new(16);
        let none = ledger.fingerprint(None);
        let right = ledger.fingerprint(Some(&Authorization::new("Basic cmlnaHQ=")));
        let wrong = ledger.fingerprint(Some(&Authorization::new("Basic d3Jvbmc=")));
        assert_ne!(none, right);
        assert_ne!(right, wrong);
        assert_eq!(
            right,
            ledger.fingerprint(Some(&Authorization::new("Basic cmlnaHQ=")))
        );

        assert!(
            ledger.refused(&digest(), right),
            "nothing known: the failure holds"
        );
        ledger.started(&digest(), none);
        ledger.finished(&digest(), Err(FailureClass::Auth));
        assert!(ledger.refused(&digest(), none));
        assert!(!ledger.refused(&digest(), right));

        ledger.started(&digest(), wrong);
        ledger.finished(&digest(), Err(FailureClass::Auth));
        assert!(ledger.refused(&digest(), wrong));
        assert!(!ledger.refused(&digest(), right));

        ledger.started(&digest(), right);
        ledger.finished(&digest(), Ok(()));
        assert!(
            ledger.refused(&digest(), none),
            "a success forgets the refusals"
        );
    }

    #[test]
    fn past_the_bound_every_other_credential_counts_as_refused() {
        let ledger = CredentialLedger::new(16);
        for i in 0..REFUSED_PER_DIGEST {
            let made_up = Authorization::new(format!("Basic {i}"));
            ledger.started(&digest(), ledger.fingerprint(Some(&made_up)));
            ledger.finished(&digest(), Err(FailureClass::Auth));
        }
        let another = ledger.fingerprint(Some(&Authorization::new("Basic another")));
        assert!(ledger.refused(&digest(), another));
    }

    #[test]
    fn keys_differ_per_ledger() {
        let auth = Authorization::new("Basic cmlnaHQ=");
        let a = CredentialLedger::new(1).fingerprint(Some(&auth));
        let b = CredentialLedger::new(1).fingerprint(Some(&auth));
        assert_ne!(a, b);
    }
}
