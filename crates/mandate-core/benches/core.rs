//! Micro-benchmarks of the domain (`cargo bench -p mandate-core`): a decision, apply of a
//! 1,000-command batch, and one append to the audit hash chain.

// The allocator the `mandate` binary ships with: Cedar and prost allocate heavily, and the
// system allocator makes a decision about 1.6 times slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mandate_core::apply::apply_batch;
use mandate_core::audit;
use mandate_core::authz::evaluate;
use mandate_core::fixture::{allowed_request, decision_world, request_context};
use mandate_core::pb::{self, command::Kind};
use mandate_core::state::Overlay;

fn decision(c: &mut Criterion) {
    let (state, mut engine, agent) = decision_world().expect("the fixture builds");
    let context = request_context();
    let request = allowed_request(&context);
    c.bench_function(
        "decision evaluation (2-hop chain, 2 ceilings, 21 policies)",
        |b| {
            b.iter(|| {
                let e = evaluate(&state, &mut engine, &agent, black_box(&request), 2_000)
                    .expect("evaluates");
                assert_eq!(e.decision, pb::Decision::Allow);
            })
        },
    );
}

fn registrations(n: usize) -> pb::CommandBatch {
    let commands = (0..n)
        .map(|i| pb::Command {
            operator_token_id: "tok_bench".into(),
            time_ms: 3_000,
            kind: Some(Kind::RegisterAgent(pb::RegisterAgent {
                agent_id: format!("agt_{:032x}", 1_000 + i),
                name: format!("batch-agent-{i}"),
                owner: "alice".into(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    pb::CommandBatch { commands }
}

fn apply_1000(c: &mut Criterion) {
    let (state, mut engine, _) = decision_world().expect("the fixture builds");
    let batch = registrations(1_000);
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("a batch of 1,000 registrations", |b| {
        b.iter(|| {
            let mut overlay = Overlay::new(&state);
            let results = apply_batch(&mut overlay, &mut engine, &batch, 100).expect("applies");
            assert!(matches!(
                results[999].outcome,
                Some(pb::command_result::Outcome::Applied(_))
            ));
            overlay.into_writes()
        })
    });
    group.finish();
}

fn chain_append(c: &mut Criterion) {
    let (state, _, _) = decision_world().expect("the fixture builds");
    let record = pb::AuditRecord {
        log_index: 100,
        r#type: "authorize".into(),
        time_ms: 3_000,
        agent: format!("agt_{:032x}", 1),
        user: "alice".into(),
        action: "read".into(),
        resource: "secret/team-a/db-password".into(),
        decision: pb::Decision::Allow as i32,
        ..Default::default()
    };
    c.bench_function("audit hash-chain append", |b| {
        b.iter_batched_ref(
            || Overlay::new(&state),
            |overlay| audit::append(overlay, black_box(record.clone())).expect("appends"),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, decision, apply_1000, chain_append);
criterion_main!(benches);
