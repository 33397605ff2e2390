//! Length prefix and body, read in input-chosen chunks, against the in-memory decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gantry_coord::fuzzing::frame_decoder(data));
