//! An envelope body judged as a responder judges a request; accepted ones round-trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gantry_coord::fuzzing::request_validation(data));
