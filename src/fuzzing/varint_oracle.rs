//! An oracle for the frame's length prefix that shares no code with the crate: the
//! `unsigned-varint` crate's decoder plus the two rules go-varint adds to plain LEB128 (at
//! most 9 bytes; the 1 MiB cap is the caller's). Used by the fuzz checks' unit tests and
//! the `frame_decoder` fuzz target, whose parent modules bring `FrameError` and
//! `length_prefix` into scope.

use super::{length_prefix, FrameError};

/// The body cap the checks run with, as the protocol's.
pub const MAX: usize = 1 << 20;

/// What go-varint's `ReadUvarint` followed by msgio's cap check makes of `bytes`: the body
/// length and the prefix's size, or why there is no frame.
pub fn expected(bytes: &[u8]) -> Result<(usize, usize), FrameError> {
    // go-varint reads at most 9 bytes: a 9th byte that says "more" is an overflow,
    // whatever follows (unsigned-varint would read a 10th).
    if bytes.len() >= 9 && bytes[..9].iter().all(|b| b & 0x80 != 0) {
        return Err(FrameError::LengthOverflow);
    }
    match unsigned_varint::decode::u64(bytes) {
        Ok((value, rest)) => {
            let consumed = bytes.len() - rest.len();
            assert!(consumed <= 9, "a prefix that stops within 9 bytes");
            if value > MAX as u64 {
                Err(FrameError::TooLarge {
                    len: value,
                    max: MAX,
                })
            } else {
                Ok((value as usize, consumed))
            }
        }
        Err(unsigned_varint::decode::Error::NotMinimal) => Err(FrameError::NonMinimalLength),
        Err(unsigned_varint::decode::Error::Insufficient) => Err(FrameError::Truncated),
        Err(other) => panic!("unexpected oracle error {other:?} for {bytes:02x?}"),
    }
}

/// The crate's prefix decoder agrees with the oracle on `bytes`.
pub fn check(bytes: &[u8]) {
    assert_eq!(
        length_prefix(bytes, MAX),
        expected(bytes),
        "prefix {bytes:02x?}"
    );
}
