//! Framing: an unsigned-varint (LEB128) byte length, then that many bytes of one
//! protobuf `Envelope`, as go-msgio and js `it-length-prefixed` write it.
//!
//! The reader enforces the cap from the prefix alone, before any body byte is read or
//! allocated, and rejects the varints Go's `go-varint` rejects.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};
use prost::Message;
use zeroize::Zeroize;

use crate::wire;

/// Longest length prefix accepted (63 bits), as go-varint's `MaxLenUvarint63`.
const MAX_PREFIX_BYTES: u8 = 9;

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix has a redundant trailing zero group, such as `0x80 0x00`.
    #[error("length prefix is not minimally encoded")]
    NonMinimalLength,
    /// The length prefix runs past 9 bytes.
    #[error("length prefix is longer than 9 bytes")]
    LengthOverflow,
    /// The declared length is above the cap; nothing of the body was read.
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge {
        /// Length the prefix declared.
        len: u64,
        /// The configured cap.
        max: usize,
    },
    /// The stream ended inside the prefix or the body.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The body is not a protobuf `Envelope`.
    #[error("frame body is not a valid protobuf envelope")]
    Undecodable,
}

/// Incremental decoder of a length prefix, fed one byte at a time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LengthPrefix {
    value: u64,
    bytes: u8,
}

impl LengthPrefix {
    /// Feeds one byte; yields the body length once the prefix is complete.
    pub(crate) fn push(&mut self, byte: u8, max: usize) -> Result<Option<usize>, FrameError> {
        let shift = 7 * u32::from(self.bytes);
        self.bytes += 1;
        self.value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 != 0 {
            return if self.bytes == MAX_PREFIX_BYTES {
                Err(FrameError::LengthOverflow)
            } else {
                Ok(None)
            };
        }
        if byte == 0 && self.bytes > 1 {
            return Err(FrameError::NonMinimalLength);
        }
        match usize::try_from(self.value) {
            Ok(len) if len <= max => Ok(Some(len)),
            _ => Err(FrameError::TooLarge {
                len: self.value,
                max,
            }),
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

/// Why reading a frame from a stream stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The stream ended cleanly before the first byte of a frame.
    Closed,
    /// The bytes are not a frame.
    Frame(FrameError),
    /// The stream failed (for example, it was reset).
    Io(io::Error),
}

impl From<FrameError> for ReadError {
    fn from(error: FrameError) -> Self {
        ReadError::Frame(error)
    }
}

/// Reads one frame from a stream, in as many polls as the bytes take to arrive.
#[derive(Debug)]
pub(crate) enum FrameReader {
    Prefix(LengthPrefix),
    Body { buf: Vec<u8>, filled: usize },
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::Prefix(LengthPrefix::default())
    }
}

impl FrameReader {
    /// Drives the read; yields the decoded envelope and its body length once the whole
    /// body is in.
    pub(crate) fn poll_read<S>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<(wire::Envelope, usize), ReadError>>
    where
        S: AsyncRead + Unpin,
    {
        loop {
            match self {
                FrameReader::Prefix(prefix) => {
                    let mut byte = [0u8; 1];
                    let n = ready!(Pin::new(&mut *io).poll_read(cx, &mut byte))
                        .map_err(ReadError::Io)?;
                    if n == 0 {
                        return Poll::Ready(Err(if prefix.is_empty() {
                            ReadError::Closed
                        } else {
                            FrameError::Truncated.into()
                        }));
                    }
                    if let Some(len) = prefix.push(byte[0], max)? {
                        *self = FrameReader::Body {
                            buf: vec![0; len],
                            filled: 0,
                        };
                    }
                }
                FrameReader::Body { buf, filled } => {
                    while *filled < buf.len() {
                        let n = ready!(Pin::new(&mut *io).poll_read(cx, &mut buf[*filled..]))
                            .map_err(ReadError::Io)?;
                        if n == 0 {
                            return Poll::Ready(Err(FrameError::Truncated.into()));
                        }
                        *filled += n;
                    }
                    let envelope = wire::Envelope::decode(buf.as_slice())
                        .map_err(|_| FrameError::Undecodable)?;
                    // A please_pull may carry delegated credentials: its bytes are wiped
                    // (only then: wiping is a byte-by-byte write of the whole frame).
                    if crate::protocol::holds_credentials(&envelope) {
                        buf.zeroize();
                    }
                    return Poll::Ready(Ok((envelope, buf.len())));
                }
            }
        }
    }
}

/// Writes one encoded frame and then closes the write side of the stream.
#[derive(Debug)]
pub(crate) struct FrameWriter {
    frame: Vec<u8>,
    written: usize,
    /// The frame carries credentials: wipe it when done.
    secret: bool,
}

/// A request frame that carries delegated credentials is wiped when the writer goes.
impl Drop for FrameWriter {
    fn drop(&mut self) {
        if self.secret {
            self.frame.zeroize();
        }
    }
}

impl FrameWriter {
    pub(crate) fn new(frame: Vec<u8>) -> Self {
        FrameWriter {
            frame,
            written: 0,
            secret: false,
        }
    }

    /// A frame that carries credentials, wiped when the writer goes.
    pub(crate) fn secret(frame: Vec<u8>) -> Self {
        FrameWriter {
            frame,
            written: 0,
            secret: true,
        }
    }

    /// A writer that sends nothing and only closes: how a responder rejects.
    pub(crate) fn close_only() -> Self {
        FrameWriter::new(Vec::new())
    }

    pub(crate) fn poll_write_and_close<S>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>>
    where
        S: AsyncWrite + Unpin,
    {
        while self.written < self.frame.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.frame[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Pin::new(&mut *io).poll_close(cx)
    }
}

/// Encodes an envelope as one frame, refusing bodies above `max` bytes.
pub(crate) fn encode_frame(envelope: &wire::Envelope, max: usize) -> Result<Vec<u8>, FrameError> {
    let len = envelope.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    Ok(envelope.encode_length_delimited_to_vec())
}

/// Decodes one complete frame held in memory; trailing bytes are an error.
#[cfg(any(test, fuzzing))]
pub(crate) fn decode_frame(bytes: &[u8], max: usize) -> Result<wire::Envelope, FrameError> {
    let mut prefix = LengthPrefix::default();
    for (i, &byte) in bytes.iter().enumerate() {
        if let Some(len) = prefix.push(byte, max)? {
            let body = &bytes[i + 1..];
            if body.len() != len {
                return Err(FrameError::Truncated);
            }
            return wire::Envelope::decode(body).map_err(|_| FrameError::Undecodable);
        }
    }
    Err(FrameError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn prefix(bytes: &[u8]) -> Result<Option<usize>, FrameError> {
        let mut prefix = LengthPrefix::default();
        let mut last = Ok(None);
        for &b in bytes {
            last = prefix.push(b, MAX);
            if !matches!(last, Ok(None)) {
                break;
            }
        }
        last
    }

    #[test]
    fn length_prefix_follows_go_varint() {
        assert_eq!(prefix(&[0x00]), Ok(Some(0)));
        assert_eq!(prefix(&[0x7f]), Ok(Some(127)));
        assert_eq!(prefix(&[0x80, 0x01]), Ok(Some(128)));
        assert_eq!(prefix(&[0x80, 0x80, 0x40]), Ok(Some(MAX)));
        assert_eq!(prefix(&[0x80, 0x00]), Err(FrameError::NonMinimalLength));
        assert_eq!(
            prefix(&[0xff, 0x80, 0x00]),
            Err(FrameError::NonMinimalLength)
        );
        assert_eq!(
            prefix(&[0x81, 0x80, 0x40]),
            Err(FrameError::TooLarge {
                len: MAX as u64 + 1,
                max: MAX
            })
        );
        assert_eq!(prefix(&[0xff; 9]), Err(FrameError::LengthOverflow));
        assert!(matches!(
            prefix(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn frames_round_trip_and_reject_trailing_bytes() {
        let envelope = wire::Envelope {
            msg: Some(wire::envelope::Msg::PullIntentRequest(
                wire::PullIntentRequest {
                    digest: "sha256:00".into(),
                },
            )),
        };
        let frame = encode_frame(&envelope, MAX).unwrap();
        assert_eq!(decode_frame(&frame, MAX), Ok(envelope.clone()));
        let mut longer = frame.clone();
        longer.push(0);
        assert_eq!(decode_frame(&longer, MAX), Err(FrameError::Truncated));
        assert_eq!(
            decode_frame(&frame[..frame.len() - 1], MAX),
            Err(FrameError::Truncated)
        );
        assert!(matches!(
            encode_frame(&envelope, 4),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
