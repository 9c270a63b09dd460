//! Generates the prost messages for every schema and, with the `grpc` feature, the tonic
//! services. protoc comes from `protoc-bin-vendored`, so a fresh machine needs only cargo.

fn main() -> std::io::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().map_err(std::io::Error::other)?;
    std::env::set_var("PROTOC", protoc);
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<_> = [
        "state", "commands", "events", "registry", "cluster", "raft", "authz", "audit",
    ]
    .iter()
    .map(|name| root.join(format!("mandate/v1/{name}.proto")))
    .collect();
    // The schemas live outside this package, so cargo would not notice them change.
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .btree_map(".")
        .compile_protos(&files, &[root])
}
