//! Verifier cost of the classifier: loads it and reports the instructions the verifier
//! processed (the number `ARCHITECTURE.md` quotes). Fails if the kernel refuses it.

use filter_tests::lab;
use filter_userspace::dataplane::Dataplane;

#[test]
fn the_classifier_verifies() {
    if !lab::e2e_enabled("verifier::the_classifier_verifies") {
        return;
    }
    match Dataplane::load(&[80]) {
        Ok(dp) => {
            let n = dp.verified_instructions().expect("program info");
            eprintln!("verifier: classifier accepted; {n} instructions processed (limit 1000000)");
            let n = dp.verified_instructions_egress().expect("program info");
            eprintln!(
                "verifier: egress classifier accepted; {n} instructions processed (limit 1000000)"
            );
        }
        Err(e) => {
            let text = e.to_string();
            let stats: Vec<&str> = text.lines().rev().take(40).collect();
            panic!("the verifier refused the classifier: {}", stats.join(" | "));
        }
    }
}
