//! What the simulator drives on each host: the agent that ships (`weft_node::Agent`), or the
//! bare gossip core (`GossipNode`) for the core's own cross-node tests. Both are sans-IO state
//! machines with the same calling contract; this trait is that contract plus the few commands
//! scenarios issue.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use weft_gossip::{Config, Event, GossipNode, NodeId, ObjectType, TableSpec, TableWatcher, Transmit};
use weft_node::persist::PersistBatch;
use weft_node::{Agent, Command, Output, Reply};

/// The tables every simulated host registers: a node-owned table of endpoints and a cluster
/// table of definitions.
pub const TABLES: [&str; 2] = ["endpoints", "defs"];

fn spec(table: &str) -> TableSpec {
    if table == "defs" {
        TableSpec::cluster(ObjectType::Network)
    } else {
        TableSpec::node_owned(ObjectType::Endpoint)
    }
}

/// A sans-IO host the simulator can run.
pub trait Host: Sized {
    /// Whether the host hands out persist batches ([`poll_persist`](Self::poll_persist)) and
    /// waits for them to be durable; a host that does not is taken to persist at once.
    const PERSISTS: bool = false;
    /// Builds the host for `id` at `now`, its Lamport clock starting at the persisted `ltime`,
    /// with [`TABLES`] registered.
    /// `disk` is what the host's store holds (empty for a new data dir).
    fn boot(
        cfg: &Config,
        id: NodeId,
        seed: u64,
        ltime: u64,
        disk: &std::collections::BTreeMap<String, Vec<u8>>,
        now: Instant,
    ) -> Self;
    /// The gossip core, for reads.
    fn core(&self) -> &GossipNode;
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]);
    fn handle_stream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_transmit(&mut self) -> Option<Transmit>;
    fn poll_event(&mut self, now: Instant) -> Option<Event>;
    fn poll_timeout(&self) -> Option<Instant>;
    fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), String>;
    fn leave(&mut self, now: Instant) -> Result<(), String>;
    /// Stops for a restart: peers keep its entries for `restart_grace`.
    fn stop_restarting(&mut self, now: Instant) -> Result<(), String>;
    /// Whether an earlier instance's entries are still to delete (persisted across restarts).
    fn set_predecessor_sweep(&mut self, pending: bool);
    /// The next batch of durable-state changes to write.
    fn poll_persist(&mut self) -> Option<PersistBatch> {
        None
    }
    /// Applies the host's pending data-plane operations to its data plane (which belongs to
    /// the simulated host and outlives the agent), handing each result back.
    fn apply_dataplane(&mut self, _now: Instant, _dp: &mut weft_overlay::MemDataplane) {}
    /// Every batch up to `seq` is durable.
    fn handle_persisted(&mut self, _now: Instant, _seq: u64) {}
    /// Defines a network cluster-wide (and attaches this host); returns its id.
    fn define_network(&mut self, now: Instant, name: &str) -> Result<String, String>;
    /// Attaches to the network with this id.
    fn attach(&mut self, now: Instant, network: &str) -> Result<(), String>;
    fn detach(&mut self, now: Instant, network: &str) -> Result<(), String>;
    /// Writes `value` under `key` (create or update), or deletes it with `None`.
    fn write(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Option<Bytes>,
    ) -> Result<(), String>;
}

impl Host for GossipNode {
    fn boot(
        cfg: &Config,
        id: NodeId,
        seed: u64,
        ltime: u64,
        _disk: &std::collections::BTreeMap<String, Vec<u8>>,
        now: Instant,
    ) -> Self {
        let mut node = GossipNode::new(cfg.clone(), id, seed, ltime, now).expect("a valid config");
        for t in TABLES {
            node.register_table(t, spec(t)).expect("register");
        }
        node
    }

    fn core(&self) -> &GossipNode {
        self
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        GossipNode::handle_datagram(self, now, from, bytes);
    }

    fn handle_stream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        GossipNode::handle_stream(self, now, from, bytes);
    }

    fn handle_timeout(&mut self, now: Instant) {
        GossipNode::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        GossipNode::poll_transmit(self)
    }

    fn poll_event(&mut self, _now: Instant) -> Option<Event> {
        GossipNode::poll_event(self)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        GossipNode::poll_timeout(self)
    }

    fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), String> {
        GossipNode::join(self, now, seeds).map_err(|e| e.to_string())
    }

    fn leave(&mut self, now: Instant) -> Result<(), String> {
        GossipNode::leave(self, now).map_err(|e| e.to_string())
    }

    fn stop_restarting(&mut self, now: Instant) -> Result<(), String> {
        GossipNode::stop_restarting(self, now).map_err(|e| e.to_string())
    }

    fn set_predecessor_sweep(&mut self, pending: bool) {
        GossipNode::set_predecessor_sweep(self, pending);
    }

    fn define_network(&mut self, now: Instant, name: &str) -> Result<String, String> {
        self.join_network(now, name).map_err(|e| e.to_string())?;
        Ok(name.to_string())
    }

    fn attach(&mut self, now: Instant, network: &str) -> Result<(), String> {
        self.join_network(now, network).map_err(|e| e.to_string())
    }

    fn detach(&mut self, now: Instant, network: &str) -> Result<(), String> {
        self.leave_network(now, network).map_err(|e| e.to_string())
    }

    fn write(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Option<Bytes>,
    ) -> Result<(), String> {
        let r = match value {
            Some(v) => self.put_entry(now, network, table, key, v),
            None => self.delete_entry(now, network, table, key),
        };
        r.map_err(|e| e.to_string())
    }
}

/// The simulator records table events itself; the agent's watchers only need to exist.
struct Quiet;

impl TableWatcher for Quiet {
    fn decode_table_entry(
        &self,
        _: &str,
        key: &str,
        _: &[u8],
    ) -> (String, std::collections::BTreeMap<String, String>) {
        (key.to_string(), Default::default())
    }
}

impl Host for Agent {
    const PERSISTS: bool = true;

    fn boot(
        cfg: &Config,
        id: NodeId,
        seed: u64,
        ltime: u64,
        disk: &std::collections::BTreeMap<String, Vec<u8>>,
        now: Instant,
    ) -> Self {
        // The allocator's state and the attached networks come back from the disk; identity
        // and clock as the simulator models them.
        // Networks attached in the earlier life come back from the disk, as in the shell.
        let nets: Vec<(String, weft_node::NetworkDef)> = disk
            .iter()
            .filter_map(|(k, v)| {
                let id = k.strip_prefix(weft_node::persist::NET_PREFIX)?;
                Some((id.to_string(), serde_json::from_slice(v).ok()?))
            })
            .collect();
        let state = weft_node::persist::NodeState {
            name: id.name.to_string(),
            instance: id.instance,
            generation: id.generation,
            ltime_hwm: ltime,
            networks: nets.iter().map(|(id, _)| id.clone()).collect(),
            sweep_pending: false,
            definitions: nets.into_iter().map(|(_, d)| d).filter(|d| !d.name.is_empty()).collect(),
            alloc: disk
                .iter()
                .filter(|(k, _)| weft_node::persist::is_alloc_key(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let mut agent = Agent::boot(cfg.clone(), &state, id.addr, seed, now).expect("a valid config");
        agent.set_dataplane(true);
        agent.record_events(true);
        for t in TABLES {
            agent.register_table(now, t, spec(t), Box::new(Quiet)).expect("register");
        }
        agent
    }

    fn core(&self) -> &GossipNode {
        self.gossip()
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        Agent::handle_datagram(self, now, from, bytes);
    }

    fn handle_stream(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        Agent::handle_stream(self, now, from, bytes);
    }

    fn handle_timeout(&mut self, now: Instant) {
        Agent::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        // Commands run with `apply`: no reply is ever queued.
        loop {
            match Agent::poll_output(self)? {
                Output::Transmit(t) => return Some(t),
                Output::Reply { .. } => continue,
            }
        }
    }

    fn poll_event(&mut self, _now: Instant) -> Option<Event> {
        Agent::poll_event(self)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Agent::poll_timeout(self)
    }

    fn poll_persist(&mut self) -> Option<PersistBatch> {
        Agent::poll_persist(self)
    }

    fn handle_persisted(&mut self, now: Instant, seq: u64) {
        Agent::handle_persisted(self, now, seq);
    }

    fn apply_dataplane(&mut self, now: Instant, dp: &mut weft_overlay::MemDataplane) {
        use weft_overlay::Dataplane;
        while let Some((id, op)) = self.poll_dataplane() {
            let r = dp.apply(&op);
            self.handle_dataplane_done(now, id, r);
        }
    }

    fn join(&mut self, now: Instant, seeds: &[SocketAddr]) -> Result<(), String> {
        done(self.apply(now, Command::Join { seeds: seeds.to_vec() }))
    }

    fn leave(&mut self, now: Instant) -> Result<(), String> {
        done(self.apply(now, Command::Leave))
    }

    fn stop_restarting(&mut self, now: Instant) -> Result<(), String> {
        done(self.apply(now, Command::StopRestarting))
    }

    fn set_predecessor_sweep(&mut self, pending: bool) {
        Agent::set_predecessor_sweep(self, pending);
    }

    fn define_network(&mut self, now: Instant, name: &str) -> Result<String, String> {
        // Scenarios about tables define networks with no addressing: `apply` cannot wait for
        // the cluster rings to be seeded or for a donation.
        let create = Command::CreateNetwork {
            name: name.to_string(),
            driver: weft_node::agent::NULL_DRIVER.into(),
            subnets: Vec::new(),
            gateway: None,
            options: Default::default(),
        };
        match self.apply(now, create) {
            Ok(Reply::Network(def)) => Ok(def.id),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn attach(&mut self, now: Instant, network: &str) -> Result<(), String> {
        // By definition when it has arrived, as `weft network attach` does; by id otherwise, as
        // a restarted agent re-attaches before the definitions reach it.
        match self.apply(now, Command::Attach { network: network.to_string() }) {
            Ok(_) => Ok(()),
            Err(weft_node::AgentError::NoSuchNetwork(_)) => {
                done(self.apply(now, Command::AttachId { id: network.to_string() }))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn detach(&mut self, now: Instant, network: &str) -> Result<(), String> {
        done(self.apply(now, Command::Detach { network: network.to_string() }))
    }

    fn write(
        &mut self,
        now: Instant,
        network: &str,
        table: &str,
        key: &str,
        value: Option<Bytes>,
    ) -> Result<(), String> {
        // The simulator writes driver tables, as a driver would: past the CLI's protection.
        let (network, table, key) = (network.to_string(), table.to_string(), key.to_string());
        let cmd = match value {
            Some(value) => Command::TablePut { network, table, key, value, force: true },
            None => Command::TableRm { network, table, key, force: true },
        };
        done(self.apply(now, cmd))
    }
}

fn done(r: weft_node::CommandResult) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}
