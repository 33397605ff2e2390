//! An envelope body decoded as a requester decodes a reply, against both requests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gantry_coord::fuzzing::reply_decoding(data));
