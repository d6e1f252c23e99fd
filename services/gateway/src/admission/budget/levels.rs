//! The budget gauges (`llmesh_budget_spent_usd`, `_remaining_usd`, `_limit_usd`): the levels Redis
//! (or this replica) last reported for each budget, kept here and read when metrics are collected.
//!
//! Synchronous gauges did that work on every call instead: three records a budget, each hashing
//! its attributes and taking the SDK's lock, about 6,750 instructions a call for a key and its
//! team (docs/BENCHMARKS.md §28). Now a call writes two levels under one lock.
//!
//! Bounded as the SDK bounds an instrument's attribute sets: at most [`MAX_BUDGETS`] budgets are
//! shown; past that, a budget not seen yet is left out (its decisions are unchanged).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use llmesh_ratelimit::budget::{self, Level};
use opentelemetry::metrics::AsyncInstrument;

use super::Labels;

/// The OpenTelemetry SDK's default cardinality limit of one instrument.
const MAX_BUDGETS: usize = 2_000;

#[derive(Debug, Default)]
pub(super) struct LastLevels {
    by_budget: Mutex<HashMap<Labels, Level>>,
}

/// Which of a budget's levels a gauge shows.
#[derive(Debug, Clone, Copy)]
pub enum Shown {
    Spent,
    Remaining,
    Limit,
}

impl LastLevels {
    /// Keeps `levels`, one per budget of `labels`, in their order.
    pub(super) fn note(&self, labels: &[Labels], levels: &[Level]) {
        let mut by_budget = self.by_budget.lock().unwrap_or_else(PoisonError::into_inner);
        for (labels, level) in labels.iter().zip(levels) {
            if let Some(last) = by_budget.get_mut(labels) {
                *last = *level;
            } else if by_budget.len() < MAX_BUDGETS {
                by_budget.insert(labels.clone(), *level);
            }
        }
    }

    /// Observes `shown` of every budget kept (a budget without a limit shows no limit nor
    /// remaining).
    pub(super) fn observe(&self, shown: Shown, gauge: &dyn AsyncInstrument<f64>) {
        let by_budget = self.by_budget.lock().unwrap_or_else(PoisonError::into_inner);
        for (labels, level) in by_budget.iter() {
            let nanos = match shown {
                Shown::Spent => Some(level.spent),
                Shown::Remaining => level.remaining(),
                Shown::Limit => level.limit,
            };
            if let Some(nanos) = nanos {
                gauge.observe(budget::nanos_to_usd(nanos), &labels.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::KeyValue;

    use super::*;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(f64, Vec<KeyValue>)>>);

    impl AsyncInstrument<f64> for Seen {
        fn observe(&self, value: f64, attributes: &[KeyValue]) {
            self.0.lock().expect("seen").push((value, attributes.to_vec()));
        }
    }

    fn labels(scope: &'static str, name: &str) -> Labels {
        Labels([KeyValue::new("scope", scope), KeyValue::new("name", name.to_string())])
    }

    fn seen(levels: &LastLevels, shown: Shown) -> Vec<(f64, Vec<KeyValue>)> {
        let seen = Seen::default();
        levels.observe(shown, &seen);
        let mut seen = seen.0.into_inner().expect("seen");
        seen.sort_by(|a, b| a.0.total_cmp(&b.0));
        seen
    }

    #[test]
    fn the_last_levels_of_each_budget_are_shown() {
        let levels = LastLevels::default();
        let (key, team) = (labels("key", "alice"), labels("team", "ml"));
        let usd = |dollars: u64| dollars * 1_000_000_000;
        let level =
            |spent, held, limit: Option<u64>| Level { spent: usd(spent), held: usd(held), limit: limit.map(usd) };
        levels.note(&[key.clone(), team.clone()], &[level(1, 0, Some(10)), level(5, 0, None)]);
        levels.note(&[key.clone(), team.clone()], &[level(2, 1, Some(10)), level(6, 0, None)]);
        assert_eq!(seen(&levels, Shown::Spent), vec![(2.0, key.0.to_vec()), (6.0, team.0.to_vec())]);
        // The team has no limit: neither a limit nor what remains of one.
        assert_eq!(seen(&levels, Shown::Remaining), vec![(7.0, key.0.to_vec())]);
        assert_eq!(seen(&levels, Shown::Limit), vec![(10.0, key.0.to_vec())]);
    }

    #[test]
    fn budgets_past_the_bound_are_left_out() {
        let levels = LastLevels::default();
        for n in 0..MAX_BUDGETS + 10 {
            levels.note(&[labels("key", &format!("k{n}"))], &[Level::default()]);
        }
        assert_eq!(seen(&levels, Shown::Spent).len(), MAX_BUDGETS);
        // One already shown is still brought up to date.
        levels.note(&[labels("key", "k0")], &[Level { spent: 3_000_000_000, ..Level::default() }]);
        assert!(seen(&levels, Shown::Spent).contains(&(3.0, labels("key", "k0").0.to_vec())));
    }
}
