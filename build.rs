//! Generates the wire types from `proto/coord.proto` with a pure-Rust protobuf
//! compiler, so building needs no system `protoc`.

fn main() {
    const PROTO: &str = "proto/coord.proto";
    println!("cargo:rerun-if-changed={PROTO}");

    let descriptors = match protox::compile([PROTO], ["proto"]) {
        Ok(descriptors) => descriptors,
        Err(error) => panic!("{PROTO} does not compile: {error:?}"),
    };
    let mut config = prost_build::Config::new();
    if let Err(error) = config.compile_fds(descriptors) {
        panic!("generating Rust from {PROTO} failed: {error}");
    }
}
