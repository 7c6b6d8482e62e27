//! One deadline-ordered timer table for foca's timers and the core's own; ties fire in
//! insertion order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::identity::NodeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TimerKind {
    Foca(foca::Timer<NodeId>),
    Gossip,
    Sync,
    Reap,
    Rejoin,
    /// Relay the news learned since the last relay (see `Config::relay_delay`).
    Relay,
    /// The restart grace of this member is over (see `Config::restart_grace`).
    Grace(Arc<str>),
    /// A node stopping for a restart leaves membership now: its record went out first.
    Depart,
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    table: BTreeMap<(Instant, u64), TimerKind>,
    seq: u64,
}

impl Timers {
    pub fn add(&mut self, at: Instant, kind: TimerKind) {
        self.seq += 1;
        self.table.insert((at, self.seq), kind);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.table.keys().next().map(|(at, _)| *at)
    }

    /// Removes and returns the earliest timer due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<TimerKind> {
        let entry = self.table.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deadline_order_then_insertion_order() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.add(t0 + Duration::from_millis(5), TimerKind::Sync);
        t.add(t0 + Duration::from_millis(1), TimerKind::Reap);
        t.add(t0 + Duration::from_millis(5), TimerKind::Gossip);
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(1)));
        assert_eq!(t.pop_due(t0), None);
        let now = t0 + Duration::from_millis(5);
        assert_eq!(t.pop_due(now), Some(TimerKind::Reap));
        assert_eq!(t.pop_due(now), Some(TimerKind::Sync));
        assert_eq!(t.pop_due(now), Some(TimerKind::Gossip));
        assert_eq!(t.pop_due(now), None);
        assert_eq!(t.next_deadline(), None);
    }
}
