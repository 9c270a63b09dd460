//! Black-box fault injection against real Mandate clusters.
//!
//! [`cluster::Cluster`] runs N nodes as containers (the image is built FROM scratch out of this
//! build's `mandate` binary, as `deploy/build-local-image.sh` does) on a private Docker network,
//! one host name and address per node, TLS and peer mTLS as in production; the test process
//! reaches them only through ports published on 127.0.0.1. Nemeses act on the containers
//! (`docker kill`, `docker pause`, `docker network disconnect`). Every operation a workload
//! runs is recorded in a [`history::History`] (invocation, completion, node, outcome), and
//! [`check`] proves invariants over it once the cluster has healed.

pub mod check;
pub mod cluster;
pub mod history;
pub mod linearizability;
pub mod scenario;
pub mod sim;
pub mod workload;
