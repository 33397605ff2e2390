//! Length prefix and body, read in input-chosen chunks, against the in-memory decoder; and
//! the length prefix alone against an oracle that shares no code with the crate.
#![no_main]

#[path = "../../tests/oracle/varint.rs"]
mod varint_oracle;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gantry_coord::fuzzing::frame_decoder(data);
    varint_oracle::check(data);
});
