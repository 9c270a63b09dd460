//! deploy/: the compose file works here. The image is built FROM scratch out of this build's
//! binary (no registry), three nodes come up with TLS, persistent volumes and health checks,
//! and the product story runs against them from the host. Needs the Docker engine and Compose.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{stderr, wait_for, MANDATE};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `docker compose` (the plugin) or, where only it exists, `docker-compose`.
fn compose() -> Vec<String> {
    let plugin = Command::new("docker").args(["compose", "version"]).output();
    if plugin.is_ok_and(|o| o.status.success()) {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// The project's containers, volumes and image, removed when the test ends however it ends.
struct Deployment {
    project: String,
    image: String,
    env: Vec<(String, String)>,
}

impl Deployment {
    fn compose(&self, args: &[&str]) -> Output {
        let cmd = compose();
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["-p", &self.project, "-f"])
            .arg(deploy_dir().join("docker-compose.yml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run compose (is Docker Compose installed?)")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "--volumes", "--timeout", "5"]);
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

fn mandate(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(MANDATE)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run mandate")
}

#[test]
fn the_compose_cluster_comes_up_with_tls_and_runs_the_story() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let tls = tmp.path().join("tls");
    let init = Command::new(deploy_dir().join("init.sh"))
        .arg(&tls)
        .env("MANDATE", MANDATE)
        .output()
        .expect("deploy/init.sh");
    assert!(init.status.success(), "init.sh: {}", stderr(&init));
    let project = format!("mandatetest{}", std::process::id());
    let image = format!("mandate:test-{}", std::process::id());
    let build = Command::new(deploy_dir().join("build-local-image.sh"))
        .args([MANDATE, &image])
        .output()
        .expect("deploy/build-local-image.sh (is Docker running?)");
    assert!(build.status.success(), "image build: {}", stderr(&build));
    let ports = ["25400", "25401", "25402"];
    let deployment = Deployment {
        project,
        image: image.clone(),
        env: vec![
            ("MANDATE_IMAGE".into(), image),
            (
                "MANDATE_TLS_DIR".into(),
                tls.to_str().expect("utf-8").into(),
            ),
            ("MANDATE_PORT_1".into(), ports[0].into()),
            ("MANDATE_PORT_2".into(), ports[1].into()),
            ("MANDATE_PORT_3".into(), ports[2].into()),
        ],
    };
    let up = deployment.compose(&["up", "-d"]);
    assert!(up.status.success(), "compose up: {}", stderr(&up));

    let ca = tls.join("ca.pem");
    let ca = ca.to_str().expect("utf-8");
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for addr in &addrs {
        wait_for(
            &format!("the node published at {addr} to be alive"),
            Duration::from_secs(60),
            || {
                let out = mandate(&[("MANDATE_CA_CERT", ca)], &["health", "--addr", addr]);
                out.status.success().then_some(())
            },
        );
    }
    let init = mandate(
        &[("MANDATE_CA_CERT", ca)],
        &["cluster", "init", "--addr", &addrs[0], "--json"],
    );
    assert!(init.status.success(), "cluster init: {}", stderr(&init));
    let init: serde_json::Value = serde_json::from_slice(&init.stdout).expect("init json");
    let token = init["root_token"].as_str().expect("root token").to_owned();
    let all = addrs.join(",");
    let env = [
        ("MANDATE_CA_CERT", ca),
        ("MANDATE_ADDR", all.as_str()),
        ("MANDATE_TOKEN", token.as_str()),
    ];
    for addr in &addrs {
        wait_for(
            &format!("{addr} to be ready"),
            Duration::from_secs(30),
            || {
                let out = mandate(&env, &["health", "--ready", "--addr", addr]);
                out.status.success().then_some(())
            },
        );
    }
    let demo = mandate(&env, &["demo"]);
    let story = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "demo: {}\n{story}", stderr(&demo));
    assert!(story.contains("Demo complete"), "{story}");

    // Every container passes the image's own health check (`mandate health` over TLS).
    wait_for(
        "every container to report healthy",
        Duration::from_secs(60),
        || {
            let ps = deployment.compose(&["ps"]);
            let listed = String::from_utf8_lossy(&ps.stdout).into_owned();
            (listed.matches("(healthy)").count() == 3).then_some(())
        },
    );
}
