//! Length prefix and body, read in input-chosen chunks, against the in-memory decoder; and
//! the length prefix alone against an oracle that shares no code with the crate.
#![no_main]

// What the oracle compares against, as its parent module must provide.
use gantry_coord::{fuzzing::length_prefix, FrameError};

#[path = "../../src/fuzzing/varint_oracle.rs"]
mod varint_oracle;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gantry_coord::fuzzing::frame_decoder(data);
    varint_oracle::check(data);
});
