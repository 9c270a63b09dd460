//! In-process decision evaluation: the chain check, the agent's ceiling and the Cedar policies,
//! exactly as apply runs them, over an in-memory state built through apply itself.

use std::time::Instant;

use mandate_core::authz::evaluate;
use mandate_core::fixture::{allowed_request, decision_world, request_context};
use mandate_core::pb;
use serde_json::json;

use crate::output::print;
use crate::Failure;

pub fn run(iterations: u64, as_json: bool) -> Result<(), Failure> {
    let (state, mut engine, agent) = decision_world().map_err(Failure)?;
    let context = request_context();
    let request = allowed_request(&context);
    let started = Instant::now();
    let mut allowed = 0u64;
    for _ in 0..iterations {
        let eval =
            evaluate(&state, &mut engine, &agent, &request, 2_000).map_err(|e| Failure(e.0))?;
        if eval.decision == pb::Decision::Allow {
            allowed += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if allowed != iterations {
        return Err(Failure(format!(
            "only {allowed} of {iterations} evaluations allowed"
        )));
    }
    let per_second = iterations as f64 / elapsed;
    if as_json {
        print(
            &json!({ "iterations": iterations, "seconds": elapsed, "evaluations_per_second": per_second, "chain_depth": 2, "policies": 21 }),
            true,
        );
    } else {
        println!("{iterations} evaluations (2-hop chain, ceiling, 21 policies) in {elapsed:.2} s: {per_second:.0}/s on one core");
    }
    Ok(())
}
