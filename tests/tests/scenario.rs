//! The scenario fuzz target's inputs replayed as tests: two agents driven by bytes through
//! the simulator (faults, NAT, TURN, commands), invariants checked after every step
//! (`shell/src/sim/scenario.rs`). Every seed input of `fuzz/corpus/scenario` runs here.

use call_assist::sim::scenario::run_bytes;

#[test]
fn every_committed_scenario_input_keeps_the_invariants() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/scenario");
    let (mut n, mut calls, mut connected) = (0, 0, 0);
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/scenario") {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let r = run_bytes(&data);
        println!("{}: {r:?}", path.display());
        calls += r.calls;
        connected += r.connected;
        n += 1;
    }
    assert!(n >= 4, "only {n} scenario inputs in {}", dir.display());
    // The corpus is not idle: calls are placed and some connect (through NAT and TURN too).
    assert!(
        calls >= 4 && connected >= 2,
        "{calls} calls, {connected} connected"
    );
}

#[test]
fn seeded_random_scenarios_keep_the_invariants() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..6 {
        let data: Vec<u8> = (0..80)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        run_bytes(&data);
    }
}
