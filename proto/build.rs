//! Compile the .proto files with protox (pure Rust), so that a fresh machine
//! needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "wavegate/v1/wavegate.proto";
    let etcd = "etcd/v3.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={etcd}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // The etcd client's side of the subset of etcd's API the etcd store uses.
    let fds = protox::compile([etcd], ["."])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    Ok(())
}
