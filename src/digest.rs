//! OCI content digests, validated as the Go nodes' `digest.Parse` does.

use std::{fmt, str::FromStr};

/// A validated OCI content digest: `sha256:` and 64 lowercase hex characters.
///
/// Only that form is accepted, as the Go nodes' `digest.Parse` accepts nothing else: a
/// digest one side takes and the other refuses would split the cluster on who may pull
/// it. It is parsed once and kept as its 32 bytes, so it is `Copy` and costs nothing to
/// pass around; [`Display`](fmt::Display) and [`Digest::encode`] give the canonical text,
/// which is what goes on the wire and into HRW scores.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a usable [`Digest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// Not `algorithm:encoded`, or either part has characters the grammar forbids.
    #[error("digest is not of the form algorithm:encoded")]
    InvalidFormat,
    /// An algorithm other than sha256 (sha512 included).
    #[error("digest algorithm is not supported")]
    Unsupported,
    /// The encoded part is not 64 characters long.
    #[error("sha256 digest must have 64 hex characters")]
    InvalidLength,
}

/// The length of the canonical text: `sha256:` and 64 hex characters.
const CANONICAL_LEN: usize = 71;
const PREFIX: &str = "sha256:";

impl Digest {
    /// Parses and validates a digest.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        validate(s)?;
        let hex = &s.as_bytes()[PREFIX.len()..];
        let nibble = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            _ => c - b'a' + 10,
        };
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        Ok(Digest(bytes))
    }

    /// The digest of content whose SHA-256 is `hash`.
    pub const fn from_sha256(hash: [u8; 32]) -> Self {
        Digest(hash)
    }

    /// The algorithm part: always `sha256`.
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    /// The 32 bytes the hex part encodes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The canonical text, `sha256:<hex>`, on the stack.
    pub fn encode(&self) -> EncodedDigest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; CANONICAL_LEN];
        text[..PREFIX.len()].copy_from_slice(PREFIX.as_bytes());
        for (pair, byte) in text[PREFIX.len()..].chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        EncodedDigest(text)
    }
}

/// A digest's canonical text, `sha256:` and 64 lowercase hex characters, without an
/// allocation: what the wire carries and HRW hashes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EncodedDigest([u8; CANONICAL_LEN]);

impl EncodedDigest {
    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The 64 hex characters alone, as content stores name their files.
    pub fn hex(&self) -> &str {
        &self.as_str()[PREFIX.len()..]
    }
}

impl std::ops::Deref for EncodedDigest {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for EncodedDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for EncodedDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// `digest.Parse`'s checks, in its order, without allocating.
fn validate(s: &str) -> Result<(), DigestError> {
    let Some((algorithm, encoded)) = s.split_once(':') else {
        return Err(DigestError::InvalidFormat);
    };
    if algorithm.is_empty() || encoded.is_empty() {
        return Err(DigestError::InvalidFormat);
    }
    if algorithm != "sha256" {
        return Err(DigestError::Unsupported);
    }
    if encoded.len() != 64 {
        return Err(DigestError::InvalidLength);
    }
    if !is_lower_hex(encoded.as_bytes()) {
        return Err(DigestError::InvalidFormat);
    }
    Ok(())
}

/// Every byte in `[0-9a-f]`. Checks all bytes without stopping early, so the loop has no
/// branch per byte and compiles to vector code: a please_pull checks hundreds of these.
fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |all, &b| {
        all & ((b.wrapping_sub(b'0') < 10) | (b.wrapping_sub(b'a') < 6))
    })
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl TryFrom<&str> for Digest {
    type Error = DigestError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Digest::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.encode())
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> Self {
        digest.encode().as_str().to_owned()
    }
}

/// `sha256:` and the byte `n` 32 times in hex: distinct digests for the crate's tests.
#[cfg(test)]
pub(crate) fn sample(n: u8) -> Digest {
    Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn accepts_sha256_only() {
        let d = Digest::parse(&format!("sha256:{HEX64}")).unwrap();
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.to_string(), format!("sha256:{HEX64}"));
        assert_eq!(d.encode().as_str(), format!("sha256:{HEX64}"));
        assert_eq!(Digest::from_sha256(d.to_bytes()), d);
        assert_eq!(d.encode().hex(), HEX64);
        assert_eq!(std::mem::size_of::<Digest>(), 32);
        assert_eq!(
            Digest::parse(&format!("sha512:{HEX64}{HEX64}")),
            Err(DigestError::Unsupported),
            "the Go nodes refuse sha512"
        );
    }

    #[test]
    fn hex_check_matches_the_grammar_for_every_byte() {
        for b in 0..=u8::MAX {
            let expected = matches!(b, b'0'..=b'9' | b'a'..=b'f');
            for at in [0, 31, 63] {
                let mut encoded = HEX64.as_bytes().to_vec();
                encoded[at] = b;
                assert_eq!(is_lower_hex(&encoded), expected, "byte {b:#04x} at {at}");
            }
        }
    }

    #[test]
    fn rejects_as_go_digest_does() {
        let cases = [
            ("", DigestError::InvalidFormat),
            ("sha256", DigestError::InvalidFormat),
            ("sha256:", DigestError::InvalidFormat),
            (":abc", DigestError::InvalidFormat),
            ("sha256:abc", DigestError::InvalidLength),
            (
                &format!("sha256:{}", HEX64.to_uppercase()),
                DigestError::InvalidFormat,
            ),
            (&format!("sha256:{HEX64}0"), DigestError::InvalidLength),
            (&format!("sha512:{HEX64}"), DigestError::Unsupported),
            (&format!("sha256:{HEX64}:"), DigestError::InvalidLength),
            (
                "md5:d41d8cd98f00b204e9800998ecf8427e",
                DigestError::Unsupported,
            ),
            ("sha384:abc", DigestError::Unsupported),
            ("SHA256:abc", DigestError::Unsupported),
            ("sha256+:abc", DigestError::Unsupported),
            ("foo:a b", DigestError::Unsupported),
            (
                &format!("sha256:{}", "g".repeat(64)),
                DigestError::InvalidFormat,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Digest::parse(input), Err(want), "{input:?}");
        }
    }
}
