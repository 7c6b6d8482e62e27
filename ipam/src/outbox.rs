//! Persist before use: outputs that let other nodes rely on a change wait until the change is
//! on disk.
//!
//! Every change bumps a generation. The caller reads [`Outbox::generation`], writes the state
//! (fsync), then calls [`Outbox::persisted`] with that generation: outputs emitted up to it are
//! released, later ones stay held. A shell that writes off-thread while the state moves on
//! therefore never releases an answer for a change its write did not contain.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct Outbox<O> {
    generation: u64,
    persisted: u64,
    held: VecDeque<(u64, O)>,
    out: VecDeque<O>,
}

impl<O> Default for Outbox<O> {
    fn default() -> Self {
        Outbox { generation: 0, persisted: 0, held: VecDeque::new(), out: VecDeque::new() }
    }
}

impl<O> Outbox<O> {
    /// A change that must reach disk before anything emitted after it leaves.
    pub fn touch(&mut self) {
        self.generation += 1;
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_dirty(&self) -> bool {
        self.generation > self.persisted
    }

    /// An output that depends on the state so far: held while that state is not on disk.
    pub fn emit(&mut self, o: O) {
        if self.is_dirty() {
            self.held.push_back((self.generation, o));
        } else {
            self.out.push_back(o);
        }
    }

    /// An output that depends on nothing unwritten (a report for the log).
    pub fn event(&mut self, o: O) {
        self.out.push_back(o);
    }

    /// The state as of `generation` is on disk.
    pub fn persisted(&mut self, generation: u64) {
        self.persisted = self.persisted.max(generation.min(self.generation));
        while self.held.front().is_some_and(|(g, _)| *g <= self.persisted) {
            let (_, o) = self.held.pop_front().expect("checked");
            self.out.push_back(o);
        }
    }

    pub fn poll(&mut self) -> Option<O> {
        self.out.pop_front()
    }

    /// Drops held outputs (a crash: they never left).
    pub fn clear_held(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_waits_for_the_generation_that_contains_its_change() {
        let mut o = Outbox::default();
        o.emit("clean");
        o.touch();
        o.emit("a");
        let written = o.generation();
        o.touch();
        o.emit("b");
        o.event("report");
        assert_eq!(o.poll(), Some("clean"));
        assert_eq!(o.poll(), Some("report"));
        assert_eq!(o.poll(), None, "a and b wait");
        o.persisted(written);
        assert_eq!(o.poll(), Some("a"));
        assert_eq!(o.poll(), None, "b's change was not in that write");
        assert!(o.is_dirty());
        o.persisted(o.generation());
        assert_eq!(o.poll(), Some("b"));
        assert!(!o.is_dirty());
        o.persisted(0);
        assert!(!o.is_dirty(), "an old write does not undo a newer one");
    }
}
