//! A linearizability checker in the manner of Wing & Gong, with Lowe's memoization of visited
//! (linearized set, state) pairs, as Porcupine does it.
//!
//! A history is a set of calls, each with an invocation time, a completion time and an output.
//! It is linearizable when some total order of the calls respects real time (a call that
//! completed before another was invoked comes first) and replays on the sequential model with
//! the outputs observed. A call whose outcome is unknown (a timeout, a lost connection) may
//! have taken effect at any point after its invocation, or never: it completes "at infinity"
//! and its output is not compared, so it can always be placed after every other call.
//!
//! Histories are checked per key ([`check_partitioned`]): a registry record is independent of
//! every other, and linearizability is compositional (Herlihy & Wing), which keeps the search
//! small.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output: PartialEq;
    fn init(&self) -> Self::State;
    /// The state after `input`, and what it answers.
    fn step(&self, state: &Self::State, input: &Self::Input) -> (Self::State, Self::Output);
}

/// One call as the client saw it. Times are on one clock (microseconds since the history
/// began, say).
#[derive(Debug, Clone)]
pub struct Call<I, O> {
    pub input: I,
    pub invoked: u64,
    /// `None`: no answer; it may or may not have taken effect.
    pub completed: Option<(u64, O)>,
}

/// What the search concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order works; `calls` is how many calls the history had.
    Violation {
        calls: usize,
    },
    /// The search gave up after `steps` steps (the history is too concurrent to decide).
    Undecided {
        steps: u64,
    },
}

/// Most search steps one history may take before [`Verdict::Undecided`].
pub const STEPS_MAX: u64 = 5_000_000;

/// The events of the history as a doubly linked list (index 0 is the head sentinel), each
/// call event holding the index of its return event.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// For each event (1-based): the call it belongs to, and whether it is the call event.
    call: Vec<(usize, bool)>,
    /// For each call: the index of its return event.
    ret: Vec<usize>,
}

const END: usize = usize::MAX;

impl Events {
    fn new<I, O>(calls: &[Call<I, O>]) -> Self {
        // (time, is_return, call). At equal times calls sort before returns, so two calls
        // touching at one instant count as concurrent: the checker never demands an order the
        // clock cannot prove.
        let mut points: Vec<(u64, bool, usize)> = Vec::with_capacity(calls.len() * 2);
        for (i, c) in calls.iter().enumerate() {
            points.push((c.invoked, false, i));
            let end = c.completed.as_ref().map_or(u64::MAX, |(t, _)| *t);
            points.push((end.max(c.invoked), true, i));
        }
        points.sort_by_key(|p| (p.0, p.1, p.2));
        let n = points.len();
        let mut events = Events {
            next: (1..=n).chain([END]).collect(),
            prev: std::iter::once(END).chain(0..n).collect(),
            call: std::iter::once((usize::MAX, false))
                .chain(points.iter().map(|p| (p.2, !p.1)))
                .collect(),
            ret: vec![0; calls.len()],
        };
        for (i, p) in points.iter().enumerate() {
            if p.1 {
                events.ret[p.2] = i + 1;
            }
        }
        events
    }

    fn unlink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = n;
        if n != END {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = e;
        if n != END {
            self.prev[n] = e;
        }
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call_event: usize) {
        let ret = self.ret[self.call[call_event].0];
        self.unlink(call_event);
        self.unlink(ret);
    }

    /// Puts them back, in the reverse order.
    fn unlift(&mut self, call_event: usize) {
        let ret = self.ret[self.call[call_event].0];
        self.relink(ret);
        self.relink(call_event);
    }
}

/// Checks one history against `model`.
pub fn check<M: Model>(model: &M, calls: &[Call<M::Input, M::Output>]) -> Verdict {
    let mut events = Events::new(calls);
    let words = calls.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut state = model.init();
    let mut seen: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut entry = events.next[0];
    let mut steps = 0u64;
    while events.next[0] != END {
        steps += 1;
        if steps > STEPS_MAX {
            return Verdict::Undecided { steps };
        }
        let (call, is_call) = events.call[entry];
        if is_call {
            let (next_state, output) = model.step(&state, &calls[call].input);
            let matches = calls[call]
                .completed
                .as_ref()
                .is_none_or(|(_, observed)| *observed == output);
            if matches {
                let mut with = linearized.clone();
                with[call / 64] |= 1 << (call % 64);
                if seen.insert((with.clone(), next_state.clone())) {
                    stack.push((entry, state));
                    state = next_state;
                    linearized = with;
                    events.lift(entry);
                    entry = events.next[0];
                    continue;
                }
            }
            entry = events.next[entry];
        } else {
            // A call returned before any order could place it: backtrack.
            let Some((top, previous)) = stack.pop() else {
                return Verdict::Violation { calls: calls.len() };
            };
            let call = events.call[top].0;
            linearized[call / 64] &= !(1 << (call % 64));
            state = previous;
            events.unlift(top);
            entry = events.next[top];
        }
    }
    Verdict::Linearizable
}

/// A model's calls, per key.
pub type CallsByKey<K, M> = BTreeMap<K, Vec<Call<<M as Model>::Input, <M as Model>::Output>>>;

/// Checks each key's calls on its own; the first key that is not linearizable (or cannot be
/// decided), with its verdict.
pub fn check_partitioned<K: Ord + Clone, M: Model>(
    model: &M,
    calls: CallsByKey<K, M>,
) -> Result<usize, (K, Verdict)> {
    let mut checked = 0;
    for (key, calls) in calls {
        match check(model, &calls) {
            Verdict::Linearizable => checked += calls.len(),
            other => return Err((key, other)),
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read/write register of integers.
    struct Register;

    #[derive(Debug, Clone, PartialEq)]
    enum Op {
        Write(u32),
        Read,
    }

    impl Model for Register {
        type State = u32;
        type Input = Op;
        type Output = Option<u32>;
        fn init(&self) -> u32 {
            0
        }
        fn step(&self, state: &u32, input: &Op) -> (u32, Option<u32>) {
            match input {
                Op::Write(v) => (*v, None),
                Op::Read => (*state, Some(*state)),
            }
        }
    }

    fn done(input: Op, invoked: u64, completed: u64, output: Option<u32>) -> Call<Op, Option<u32>> {
        Call {
            input,
            invoked,
            completed: Some((completed, output)),
        }
    }

    #[test]
    fn sequential_reads_of_the_last_write_are_linearizable() {
        let h = vec![
            done(Op::Write(1), 0, 1, None),
            done(Op::Read, 2, 3, Some(1)),
            done(Op::Write(2), 4, 5, None),
            done(Op::Read, 6, 7, Some(2)),
        ];
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_a_violation() {
        let h = vec![
            done(Op::Write(1), 0, 1, None),
            done(Op::Write(2), 2, 3, None),
            done(Op::Read, 4, 5, Some(1)),
        ];
        assert_eq!(check(&Register, &h), Verdict::Violation { calls: 3 });
    }

    #[test]
    fn a_read_concurrent_with_a_write_may_see_either_value() {
        for seen in [0, 1] {
            let h = vec![
                done(Op::Write(1), 0, 10, None),
                done(Op::Read, 2, 5, Some(seen)),
            ];
            assert_eq!(check(&Register, &h), Verdict::Linearizable, "read {seen}");
        }
    }

    #[test]
    fn reads_may_not_flip_back_to_an_older_value() {
        // Both reads overlap the write, but once one has seen the new value a later read
        // may not see the old one.
        let h = vec![
            done(Op::Write(1), 0, 100, None),
            done(Op::Read, 1, 2, Some(1)),
            done(Op::Read, 3, 4, Some(0)),
        ];
        assert_eq!(check(&Register, &h), Verdict::Violation { calls: 3 });
    }

    #[test]
    fn a_write_of_unknown_outcome_may_take_effect_late_or_never() {
        let unknown = Call {
            input: Op::Write(7),
            invoked: 0,
            completed: None,
        };
        let never = vec![unknown.clone(), done(Op::Read, 5, 6, Some(0))];
        assert_eq!(check(&Register, &never), Verdict::Linearizable);
        let late = vec![
            unknown,
            done(Op::Read, 5, 6, Some(0)),
            done(Op::Read, 50, 60, Some(7)),
        ];
        assert_eq!(check(&Register, &late), Verdict::Linearizable);
    }

    #[test]
    fn a_value_nobody_wrote_is_a_violation() {
        let h = vec![
            done(Op::Write(1), 0, 1, None),
            done(Op::Read, 2, 3, Some(9)),
        ];
        assert_eq!(check(&Register, &h), Verdict::Violation { calls: 2 });
    }

    #[test]
    fn keys_are_checked_apart_and_the_bad_one_is_named() {
        let mut calls = BTreeMap::new();
        calls.insert(
            "a",
            vec![
                done(Op::Write(1), 0, 1, None),
                done(Op::Read, 2, 3, Some(1)),
            ],
        );
        calls.insert(
            "b",
            vec![
                done(Op::Write(1), 0, 1, None),
                done(Op::Read, 2, 3, Some(0)),
            ],
        );
        let err = check_partitioned(&Register, calls).expect_err("key b is stale");
        assert_eq!(err, ("b", Verdict::Violation { calls: 2 }));
    }

    #[test]
    fn many_concurrent_writers_are_decided_quickly() {
        // 12 overlapping writes and a read of the value of one of them: the memo keeps the
        // search far below 12! orders.
        let mut h: Vec<_> = (1..=12).map(|v| done(Op::Write(v), 0, 100, None)).collect();
        h.push(done(Op::Read, 101, 102, Some(5)));
        assert_eq!(check(&Register, &h), Verdict::Linearizable);
        h.push(done(Op::Read, 103, 104, Some(13)));
        assert_eq!(check(&Register, &h), Verdict::Violation { calls: 14 });
    }
}
