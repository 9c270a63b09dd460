//! The domain crate stays pure: no async runtime, network, storage or consensus dependency.

#[test]
fn the_domain_crate_depends_on_no_runtime_network_storage_or_consensus_crate() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("read the manifest");
    let forbidden = ["tokio", "tonic", "sled", "openraft"];
    let mut section = String::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        if section == "[dependencies]" {
            let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
            assert!(!forbidden.contains(&name), "mandate-core depends on {name}");
        }
    }
    assert!(
        manifest.contains("mandate-proto.workspace = true"),
        "mandate-core must use mandate-proto without its grpc feature"
    );
}
