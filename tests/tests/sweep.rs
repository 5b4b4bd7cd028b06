//! A small seeded fault sweep: no profile may panic or leave a call without an end.

use call_assist::sweep::{profiles, run_one, sweep, Outcome};

#[test]
fn small_fault_sweep_has_no_panics_and_no_stuck_calls() {
    let reports = sweep(3, 100, |_| {});
    assert_eq!(reports.len(), profiles().len());
    for r in &reports {
        assert_eq!(r.panics, 0, "{r:?}");
        assert_eq!(r.stuck, 0, "{r:?}");
        assert_eq!(r.ended_with_reason_pct, 100.0, "{r:?}");
    }
    let clean = &reports[0];
    assert_eq!(clean.profile, "clean");
    assert_eq!(clean.connected_pct, 100.0, "{clean:?}");
    assert!(clean.setup_p50_ms.is_some());
}

#[test]
fn a_sweep_run_replays_from_its_seed() {
    for p in profiles() {
        let a = run_one(&p, 7);
        let b = run_one(&p, 7);
        assert_eq!(a.outcome, b.outcome, "{}", p.name);
        assert_eq!(a.setup_ms, b.setup_ms, "{}", p.name);
        assert_ne!(a.outcome, Outcome::Panicked, "{}", p.name);
    }
}
