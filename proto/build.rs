//! Compile the .proto files with protox (pure Rust), so that a fresh machine
//! needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "wavegate/v1/wavegate.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
