//! Allocation in the simulator (see `weft_sim::allocation`): endpoint churn on five agents with
//! datagram loss, a partition, crashes and restarts, a checker after every step (no address
//! held twice, no acknowledged endpoint lost) and every endpoint table exact at the end.
//! `WEFT_SIM_SEED` replays one seed.

#[test]
fn endpoint_churn_through_loss_partitions_crashes_and_restarts_never_duplicates_nor_loses() {
    let seeds: Vec<u64> = match std::env::var("WEFT_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("a seed")],
        Err(_) => (1..=8).collect(),
    };
    for seed in seeds {
        let r = weft_sim::allocation::allocation(5, seed, 300).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.created > 50, "seed {seed}: only {} endpoints created: nothing was tested", r.created);
        assert!(r.removed > 10, "seed {seed}: only {} removed", r.removed);
        assert_eq!(r.duplicates, 0);
    }
}
