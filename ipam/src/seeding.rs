//! Seeding a cluster-wide ring (the VNI range, the default global pool) exactly once:
//! single-decree Paxos among a fixed acceptor set, the seed-list nodes, which every agent is
//! given alike.
//!
//! Quorum is a majority of that fixed set, never of whoever is alive: each side of a partition
//! would count itself a majority. Every proposal carries the acceptor set; an acceptor
//! configured with a different one refuses it and says so. Acceptor state is persisted before
//! it answers (the same held-output pattern as the ring). Dueling proposers back off by their
//! rank in the acceptor list, so one of them gets through.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::outbox::Outbox;
use crate::ring::{Name, Seed, seed_fits};

/// Rounds at or above this are refused from the network (no honest proposer gets near), so a
/// peer can neither pin an acceptor's promise out of reach nor overflow the round counter.
pub const MAX_ROUND: u64 = 1 << 62;
/// Base retry delay of a proposal that did not complete.
pub const PAXOS_RETRY_MS: u64 = 500;

/// A proposal number: rounds grow, the proposer's name breaks ties.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub proposer: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaxosMsg {
    Prepare {
        ring: String,
        ballot: Ballot,
        acceptors: Vec<Name>,
    },
    Promise {
        ring: String,
        ballot: Ballot,
        accepted: Option<(Ballot, Seed)>,
        /// The acceptor as a ring member (`name@instance`): a seed proposed after this quorum
        /// is split among the members whose promises formed it.
        member: Name,
    },
    Accept {
        ring: String,
        ballot: Ballot,
        value: Seed,
        acceptors: Vec<Name>,
    },
    Accepted {
        ring: String,
        ballot: Ballot,
    },
    /// The acceptor promised a higher ballot.
    Nack {
        ring: String,
        ballot: Ballot,
        promised: Ballot,
    },
    /// A value was chosen (for learners).
    Chosen {
        ring: String,
        value: Seed,
    },
    /// The acceptor has a different acceptor set.
    Mismatch {
        ring: String,
        ours: Vec<Name>,
    },
}

impl PaxosMsg {
    pub fn ring(&self) -> &str {
        match self {
            PaxosMsg::Prepare { ring, .. }
            | PaxosMsg::Promise { ring, .. }
            | PaxosMsg::Accept { ring, .. }
            | PaxosMsg::Accepted { ring, .. }
            | PaxosMsg::Nack { ring, .. }
            | PaxosMsg::Chosen { ring, .. }
            | PaxosMsg::Mismatch { ring, .. } => ring,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedOutput {
    Send {
        to: Name,
        msg: PaxosMsg,
    },
    /// The ring's seed is decided: install it.
    Chosen(Seed),
    /// A node runs with a different acceptor set: one clear line for the log.
    Mismatch {
        from: Name,
        theirs: Vec<Name>,
        ours: Vec<Name>,
    },
}

/// What an acceptor and learner must not forget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeederDurable {
    pub me: Name,
    pub ring: String,
    pub acceptors: Vec<Name>,
    pub promised: Option<Ballot>,
    pub accepted: Option<(Ballot, Seed)>,
    pub chosen: Option<Seed>,
    /// The highest round seen, so a restarted proposer never reuses a ballot.
    pub max_round: u64,
    /// This node as a ring member (`name@instance`).
    #[serde(default)]
    pub member: Name,
    /// It lost its acceptor state once (see [`Seeder::set_learner_only`]): kept for good.
    #[serde(default)]
    pub learner_only: bool,
}

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    Preparing { ballot: Ballot, promises: BTreeMap<Name, (Name, Option<(Ballot, Seed)>)> },
    Accepting { ballot: Ballot, value: Seed, accepted: BTreeSet<Name> },
}

/// One node's part in seeding one ring: acceptor (if in the set), proposer, learner.
#[derive(Debug, Clone)]
pub struct Seeder {
    d: SeederDurable,
    proposal: Option<crate::ring::Space>,
    params: String,
    phase: Phase,
    deadline: Option<u64>,
    outbox: Outbox<SeedOutput>,
}

impl Seeder {
    /// `acceptors`: the seed-list nodes (order and duplicates do not matter).
    pub fn new(
        me: impl Into<Name>,
        ring: impl Into<String>,
        acceptors: impl IntoIterator<Item = Name>,
    ) -> Self {
        let mut acceptors: Vec<Name> = acceptors.into_iter().collect();
        acceptors.sort();
        acceptors.dedup();
        Seeder::restore(SeederDurable {
            me: me.into(),
            ring: ring.into(),
            acceptors,
            promised: None,
            accepted: None,
            chosen: None,
            max_round: 0,
            member: "".into(),
            learner_only: false,
        })
    }

    pub fn restore(d: SeederDurable) -> Self {
        let mut d = d;
        if d.member.is_empty() {
            d.member = d.me.clone();
        }
        Seeder {
            d,
            proposal: None,
            params: String::new(),
            phase: Phase::Idle,
            deadline: None,
            outbox: Outbox::default(),
        }
    }

    /// This node as a ring member, `name@instance` (what the seed it helps choose names).
    pub fn set_member(&mut self, member: impl Into<Name>) {
        let member = member.into();
        if self.d.member != member {
            self.d.member = member;
            self.outbox.touch();
        }
    }

    /// Makes this node a learner only, for good (persisted): an acceptor that lost its state
    /// (a new data dir under a name an earlier instance held) may have promised and forgotten.
    /// It still proposes and learns.
    pub fn set_learner_only(&mut self) {
        if !self.d.learner_only {
            self.d.learner_only = true;
            self.outbox.touch();
        }
    }

    pub fn is_learner_only(&self) -> bool {
        self.d.learner_only
    }

    /// Whether a proposal is under way.
    pub fn is_proposing(&self) -> bool {
        self.proposal.is_some() && self.d.chosen.is_none()
    }

    pub fn acceptors(&self) -> &[Name] {
        &self.d.acceptors
    }

    pub fn quorum(&self) -> usize {
        self.d.acceptors.len() / 2 + 1
    }

    pub fn chosen(&self) -> Option<&Seed> {
        self.d.chosen.as_ref()
    }

    pub fn is_dirty(&self) -> bool {
        self.outbox.is_dirty()
    }

    /// The generation of the state [`Seeder::durable`] shows now: read it before writing.
    pub fn generation(&self) -> u64 {
        self.outbox.generation()
    }

    pub fn durable(&self) -> &SeederDurable {
        &self.d
    }

    /// The state as of `generation` is on disk: answers that waited for it go out.
    pub fn persisted(&mut self, generation: u64) {
        self.outbox.persisted(generation);
    }

    pub fn poll_output(&mut self) -> Option<SeedOutput> {
        self.outbox.poll()
    }

    /// When [`Seeder::tick`] next has work.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadline
    }

    fn emit(&mut self, o: SeedOutput) {
        self.outbox.emit(o);
    }

    /// The seed this node proposes once `members` promised: the space split among them.
    pub fn seed_for(&self, space: crate::ring::Space, members: impl IntoIterator<Item = Name>) -> Seed {
        let mut owners: Vec<Name> = members.into_iter().collect();
        owners.sort();
        let params = self.params.clone();
        Seed { space, owners, seeded_by: self.d.member.clone(), params }
    }

    /// What the proposed seed's slots mean (see [`Seed::params`]).
    pub fn set_params(&mut self, params: impl Into<String>) {
        self.params = params.into();
    }

    /// Starts proposing a seed of `space`, split among the acceptors whose promises form the
    /// quorum, until a value is chosen.
    pub fn propose(&mut self, space: crate::ring::Space, now_ms: u64) {
        if self.d.chosen.is_some() || self.proposal.is_some() {
            return;
        }
        self.proposal = Some(space);
        self.start_round(now_ms);
    }

    fn retry_delay(&self) -> u64 {
        let rank = self.d.acceptors.iter().position(|a| *a == self.d.me).unwrap_or(self.d.acceptors.len());
        PAXOS_RETRY_MS * (1 + rank as u64)
    }

    fn start_round(&mut self, now_ms: u64) {
        self.d.max_round += 1;
        self.outbox.touch();
        // The proposer is the member (`name@instance`): a reinstalled node that lost its round
        // counter never reuses a ballot of its earlier life with another value.
        let ballot = Ballot { round: self.d.max_round, proposer: self.d.member.clone() };
        self.phase = Phase::Preparing { ballot: ballot.clone(), promises: BTreeMap::new() };
        self.deadline = Some(now_ms + self.retry_delay());
        for a in self.d.acceptors.clone() {
            let msg = PaxosMsg::Prepare {
                ring: self.d.ring.clone(),
                ballot: ballot.clone(),
                acceptors: self.d.acceptors.clone(),
            };
            self.emit(SeedOutput::Send { to: a, msg });
        }
    }

    /// Retries a proposal that has not completed by its deadline.
    pub fn tick(&mut self, now_ms: u64) {
        if self.d.chosen.is_some() {
            self.deadline = None;
            return;
        }
        if self.deadline.is_some_and(|d| now_ms >= d) && self.proposal.is_some() {
            self.start_round(now_ms);
        }
    }

    fn reply(&mut self, to: &Name, msg: PaxosMsg) {
        self.emit(SeedOutput::Send { to: to.clone(), msg });
    }

    fn learn(&mut self, from: &Name, value: Seed) {
        if !seed_fits(&self.d.acceptors, &value.owners) {
            // A node with another acceptor set chose among its own; never learn that.
            let (theirs, ours) = (value.owners, self.d.acceptors.clone());
            self.outbox.event(SeedOutput::Mismatch { from: from.clone(), theirs, ours });
            return;
        }
        if self.d.chosen.is_none() {
            self.d.chosen = Some(value.clone());
            self.outbox.touch();
            self.phase = Phase::Idle;
            self.deadline = None;
            self.emit(SeedOutput::Chosen(value));
        }
    }

    pub fn handle(&mut self, from: &Name, msg: &PaxosMsg) {
        if msg.ring() != self.d.ring {
            return;
        }
        let round = match msg {
            PaxosMsg::Prepare { ballot, .. }
            | PaxosMsg::Promise { ballot, .. }
            | PaxosMsg::Accept { ballot, .. }
            | PaxosMsg::Accepted { ballot, .. } => ballot.round,
            PaxosMsg::Nack { ballot, promised, .. } => ballot.round.max(promised.round),
            PaxosMsg::Chosen { .. } | PaxosMsg::Mismatch { .. } => 0,
        };
        if round >= MAX_ROUND {
            return;
        }
        let ring = self.d.ring.clone();
        match msg {
            PaxosMsg::Prepare { acceptors, .. } | PaxosMsg::Accept { acceptors, .. }
                if *acceptors != self.d.acceptors
                    || matches!(msg, PaxosMsg::Accept { value, .. } if !seed_fits(&self.d.acceptors, &value.owners)) =>
            {
                let (theirs, ours) = (acceptors.clone(), self.d.acceptors.clone());
                self.outbox.event(SeedOutput::Mismatch { from: from.clone(), theirs, ours: ours.clone() });
                self.reply(from, PaxosMsg::Mismatch { ring, ours });
            }
            _ if (self.d.learner_only || !self.d.acceptors.contains(&self.d.me))
                && matches!(msg, PaxosMsg::Prepare { .. } | PaxosMsg::Accept { .. }) => {}
            PaxosMsg::Prepare { ballot, .. } => {
                self.d.max_round = self.d.max_round.max(ballot.round);
                if let Some(v) = self.d.chosen.clone() {
                    self.reply(from, PaxosMsg::Chosen { ring, value: v });
                } else if self.d.promised.as_ref().is_none_or(|p| ballot >= p) {
                    if self.d.promised.as_ref() != Some(ballot) {
                        self.d.promised = Some(ballot.clone());
                        self.outbox.touch();
                    }
                    let accepted = self.d.accepted.clone();
                    let member = self.d.member.clone();
                    self.reply(from, PaxosMsg::Promise { ring, ballot: ballot.clone(), accepted, member });
                } else {
                    let promised = self.d.promised.clone().expect("checked");
                    self.reply(from, PaxosMsg::Nack { ring, ballot: ballot.clone(), promised });
                }
            }
            PaxosMsg::Accept { ballot, value, .. } => {
                self.d.max_round = self.d.max_round.max(ballot.round);
                let same_ballot_other_value =
                    self.d.accepted.as_ref().is_some_and(|(b, v)| b == ballot && v != value);
                if self.d.promised.as_ref().is_none_or(|p| ballot >= p) && !same_ballot_other_value {
                    if self.d.accepted.as_ref().map(|(b, _)| b) != Some(ballot) {
                        self.d.promised = Some(ballot.clone());
                        self.d.accepted = Some((ballot.clone(), value.clone()));
                        self.outbox.touch();
                    }
                    self.reply(from, PaxosMsg::Accepted { ring, ballot: ballot.clone() });
                } else {
                    let promised = self.d.promised.clone().expect("checked");
                    self.reply(from, PaxosMsg::Nack { ring, ballot: ballot.clone(), promised });
                }
            }
            PaxosMsg::Promise { ballot, accepted, member, .. } => {
                let quorum = self.quorum();
                let Phase::Preparing { ballot: mine, promises } = &mut self.phase else { return };
                if mine != ballot || !self.d.acceptors.contains(from) {
                    return;
                }
                if crate::ring::member_name(member) != &**from {
                    return;
                }
                promises.insert(from.clone(), (member.clone(), accepted.clone()));
                if promises.len() < quorum {
                    return;
                }
                // The value of the highest ballot any quorum member accepted, else ours: the
                // space split among the members whose promises formed this quorum.
                let prior = promises
                    .values()
                    .filter_map(|(_, a)| a.as_ref())
                    .max_by(|a, b| a.0.cmp(&b.0))
                    .map(|(_, v)| v.clone());
                let members: Vec<Name> = promises.values().map(|(m, _)| m.clone()).collect();
                let own = self.proposal.clone().map(|space| self.seed_for(space, members));
                let Some(value) = prior.or(own) else { return };
                let ballot = ballot.clone();
                self.phase = Phase::Accepting {
                    ballot: ballot.clone(),
                    value: value.clone(),
                    accepted: BTreeSet::new(),
                };
                for a in self.d.acceptors.clone() {
                    let msg = PaxosMsg::Accept {
                        ring: ring.clone(),
                        ballot: ballot.clone(),
                        value: value.clone(),
                        acceptors: self.d.acceptors.clone(),
                    };
                    self.emit(SeedOutput::Send { to: a, msg });
                }
            }
            PaxosMsg::Accepted { ballot, .. } => {
                let quorum = self.quorum();
                let Phase::Accepting { ballot: mine, value, accepted } = &mut self.phase else { return };
                if mine != ballot || !self.d.acceptors.contains(from) {
                    return;
                }
                accepted.insert(from.clone());
                if accepted.len() >= quorum {
                    let value = value.clone();
                    let me = self.d.me.clone();
                    self.learn(&me, value.clone());
                    for a in self.d.acceptors.clone() {
                        if a != self.d.me {
                            self.emit(SeedOutput::Send {
                                to: a,
                                msg: PaxosMsg::Chosen { ring: ring.clone(), value: value.clone() },
                            });
                        }
                    }
                }
            }
            PaxosMsg::Nack { promised, .. } => {
                if promised.round > self.d.max_round {
                    self.d.max_round = promised.round;
                    self.outbox.touch();
                }
            }
            PaxosMsg::Chosen { value, .. } => self.learn(from, value.clone()),
            PaxosMsg::Mismatch { ours, .. } => {
                let theirs = ours.clone();
                let ours = self.d.acceptors.clone();
                self.outbox.event(SeedOutput::Mismatch { from: from.clone(), theirs, ours });
            }
        }
    }
}
