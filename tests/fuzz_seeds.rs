//! The fuzz targets' checks on fixed seeds and on a deterministic pseudo-random sweep, so
//! that `cargo test` exercises them without a fuzzer. Inputs the fuzzer once found are kept
//! here as seeds.

use gantry_coord::fuzzing::{frame_decoder, request_validation};

const SEEDS: &[&[u8]] = &[
    &[],
    &[0x00],
    &[0x00, 0x00],
    &[0x03, 0x80, 0x00],
    &[
        0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ],
    &[0x01, 0x02, 0x0a, 0x00],
    &[0x02, 0x04, 0x0a, 0x02, 0x0a, 0x00, 0xff],
    &[0x07, 0x81, 0x80, 0x04],
    &[0x1a, 0x03, 0x1a, 0x01, 0x61],
    &[0x0a, 0x05, 0x0a, 0x03, 0x73, 0x3a, 0x61],
];

#[test]
fn seeds() {
    for seed in SEEDS {
        frame_decoder(seed);
        request_validation(seed);
        if let Some((_, rest)) = seed.split_first() {
            request_validation(rest);
        }
    }
}

#[test]
fn pseudo_random_sweep() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut buf = Vec::new();
    for _ in 0..20_000 {
        buf.clear();
        let len = (next() % 48) as usize;
        buf.extend((0..len).map(|_| next() as u8));
        // Bias towards plausible frames: a small length prefix and an envelope tag.
        if len > 2 && next() % 2 == 0 {
            buf[1] = (len - 2) as u8;
            buf[2] = [0x0a, 0x12, 0x1a, 0x22][(next() % 4) as usize];
        }
        frame_decoder(&buf);
        request_validation(&buf);
    }
}
