//! OCI content digests, validated as the Go nodes' `digest.Parse` does.

use std::{fmt, str::FromStr};

/// A validated OCI content digest such as `sha256:` followed by 64 hex characters.
///
/// Only `sha256` with exactly 64 lowercase hex characters is accepted, as the Go nodes'
/// `digest.Parse` accepts nothing else: a digest one side takes and the other refuses
/// would split the cluster on who may pull it. The string form is canonical: it is what
/// goes on the wire and into HRW scores.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

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

impl Digest {
    /// Parses and validates a digest.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        validate(s)?;
        Ok(Digest(s.to_owned()))
    }

    /// The canonical string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The algorithm part, such as `sha256`.
    pub fn algorithm(&self) -> &str {
        self.0
            .split_once(':')
            .map_or("", |(algorithm, _)| algorithm)
    }

    /// The 32 bytes the hex part encodes.
    pub fn to_bytes(&self) -> [u8; 32] {
        // Validated: `sha256:` and 64 lowercase hex characters.
        let hex = &self.0.as_bytes()["sha256:".len()..];
        let nibble = |c: u8| match c {
            b'0'..=b'9' => c - b'0',
            _ => c - b'a' + 10,
        };
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = nibble(pair[0]) << 4 | nibble(pair[1]);
        }
        bytes
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

impl TryFrom<String> for Digest {
    type Error = DigestError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate(&s)?;
        Ok(Digest(s))
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> Self {
        digest.0
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
        assert_eq!(d.as_str(), format!("sha256:{HEX64}"));
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
