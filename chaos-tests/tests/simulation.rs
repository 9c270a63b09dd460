//! The deterministic simulation (`mandate_chaos::sim`): raft and the state machine on
//! turmoil, under crashes, restarts and partitions chosen by a seed. CI runs a fixed list of
//! seeds; `MANDATE_SIM_SEEDS=1..500` runs a soak, `MANDATE_SIM_SEEDS=N` replays one seed.

use mandate_chaos::sim::{seeds, simulate, Plan};

/// The seeds CI runs.
const CI_SEEDS: [u64; 6] = [1, 2, 3, 4, 5, 6];

#[test]
fn every_seed_keeps_acknowledged_writes_identical_states_and_one_leader_per_term() {
    for seed in seeds(&CI_SEEDS) {
        let dir = tempfile::tempdir().expect("temp dir");
        let report = simulate(Plan::new(seed), dir.path());
        println!(
            "seed {seed}: {} acknowledged, {} unknown, {} faults, {} violations",
            report.acknowledged,
            report.unknown,
            report.faults,
            report.violations.len()
        );
        assert!(
            report.violations.is_empty(),
            "seed {seed} (replay: MANDATE_SIM_SEEDS={seed}): {:#?}\ntrace:\n{}",
            report.violations,
            report.trace.join("\n")
        );
        assert!(report.acknowledged > 0, "seed {seed}: nothing acknowledged");
    }
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let runs: Vec<Vec<String>> = (0..2)
        .map(|_| {
            let dir = tempfile::tempdir().expect("temp dir");
            simulate(Plan::new(7), dir.path()).trace
        })
        .collect();
    assert!(runs[0].len() > 10, "the run did little: {:?}", runs[0]);
    if let Some(at) = runs[0].iter().zip(&runs[1]).position(|(a, b)| a != b) {
        panic!(
            "the runs part at event {at}:\n  {}\n  {}",
            runs[0][at], runs[1][at]
        );
    }
    assert_eq!(runs[0].len(), runs[1].len());
}
