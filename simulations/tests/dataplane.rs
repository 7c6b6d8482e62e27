//! The overlay's in-memory data plane under the simulator: it belongs to the simulated host
//! and outlives the agent, as kernel state does. The checker sees drift; the agent repairs it,
//! and a restarted agent reconciles what its previous life left.

use std::time::Duration;

use weft_gossip::Config;
use weft_node::{AgentError, Command, Reply};
use weft_sim::cluster::{AgentCluster, NetModel};
use weft_sim::soak::check_dataplane;

fn endpoint(c: &mut AgentCluster, i: usize, net: &str, id: u64) {
    let sandbox = format!("/sim/{}/c", c.nodes[i].name);
    c.nodes[i].dataplane.add_sandbox_path(&sandbox);
    let cmd = Command::EndpointCreate {
        network: net.into(),
        name: format!("e{i}"),
        ip: None,
        mac: None,
        sandbox: Some(sandbox),
    };
    c.with(i, |n, now| n.handle_command(now, id, cmd));
}

#[test]
fn the_data_plane_follows_the_tables_through_drift_crashes_and_removals() {
    let seed = 7;
    let mut c = AgentCluster::new(3, seed, Config::lan(3), NetModel::default());
    let seeds: Vec<_> = (0..3).map(|i| c.nodes[i].addr).collect();
    for i in 0..3 {
        c.join(i, &seeds);
    }
    c.run_for(Duration::from_secs(3));
    let create = Command::CreateNetwork {
        name: "ov".into(),
        driver: "overlay".into(),
        subnets: vec![],
        gateway: None,
        options: Default::default(),
    };
    let mut made = Err(AgentError::WaitedTooLong(String::new()));
    for _ in 0..20 {
        made = c.with(0, |n, now| n.apply(now, create.clone()));
        if made.is_ok() {
            break;
        }
        c.run_for(Duration::from_secs(1));
    }
    let Ok(Reply::Network(def)) = made else { panic!("seed {seed}: network create: {made:?}") };
    c.run_for(Duration::from_secs(1));
    for i in 0..3 {
        endpoint(&mut c, i, &def.id, 100 + i as u64);
    }
    c.run_for(Duration::from_secs(3));
    check_dataplane(&c).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    for i in 0..3 {
        let sb = &c.nodes[i].dataplane.sandboxes[&def.id];
        assert_eq!(
            (sb.neighbours.len(), sb.fdb.len(), sb.endpoints.len()),
            (2, 2, 1),
            "seed {seed}: node {i}"
        );
    }

    // Drift behind the agent's back: the checker sees it, the periodic resync repairs it.
    let sb = c.nodes[0].dataplane.sandboxes.get_mut(&def.id).unwrap();
    let (ip, mac) = sb.neighbours.pop_first().unwrap();
    sb.neighbours.insert("10.255.0.9".parse().unwrap(), mac);
    assert!(check_dataplane(&c).is_err(), "seed {seed}: the checker sees a lost and a stale neighbour");
    c.run_for(Duration::from_secs(65));
    check_dataplane(&c).unwrap_or_else(|e| panic!("seed {seed}: not repaired: {e}"));
    assert_eq!(c.nodes[0].dataplane.sandboxes[&def.id].neighbours.get(&ip), Some(&mac));

    // Node 1 crashes; its kernel keeps its entries. Meanwhile node 2's endpoint goes. Back, node
    // 1 keeps its interface and drops the entry for the endpoint that went.
    c.crash(1);
    let rm = c.with(2, |n, now| {
        n.apply(now, Command::EndpointRm { network: def.id.clone(), endpoint: "e2".into() })
    });
    assert!(rm.is_ok(), "seed {seed}: {rm:?}");
    c.run_for(Duration::from_secs(2));
    assert_eq!(
        c.nodes[1].dataplane.sandboxes[&def.id].neighbours.len(),
        2,
        "the crashed host's kernel is as it was"
    );
    c.restart(1, &[0]);
    c.run_for(Duration::from_secs(10));
    check_dataplane(&c).unwrap_or_else(|e| panic!("seed {seed}: after the restart: {e}"));
    let sb = &c.nodes[1].dataplane.sandboxes[&def.id];
    assert_eq!((sb.neighbours.len(), sb.endpoints.len()), (1, 1), "seed {seed}: {sb:?}");
    assert!(
        !c.nodes[2].dataplane.sandboxes.contains_key(&def.id),
        "seed {seed}: node 2's last endpoint took its sandbox"
    );
}
