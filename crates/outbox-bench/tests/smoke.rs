//! The harness's quick mode as a smoke check in the test suite (so it is built with the same
//! features as every other test and costs no extra build in CI). It asserts that the harness runs
//! and reports every scenario; it asserts no figure: this machine is shared and noisy, and the
//! measured runs are in BENCHMARKS.md.

use std::process::Command;

#[test]
fn quick_mode_runs_every_scenario_and_reports_results() {
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-bench"))
        .arg("--quick")
        .env("DATABASE_URL", admin)
        .output()
        .expect("the benchmark harness runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "outbox-bench --quick failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    for scenario in ["drain", "latency", "producer", "observability"] {
        assert!(
            stdout.contains(&format!("RESULT {scenario} ")),
            "no RESULT line for {scenario}:\n{stdout}"
        );
    }
    // scripts/test.sh starts every broker, so none may be skipped here.
    for broker in ["sqs", "sns", "kafka", "nats", "rabbitmq", "webhook"] {
        assert!(
            stdout.contains(&format!("RESULT broker destination={broker} workers=")),
            "no measured RESULT line for broker {broker}:\n{stdout}"
        );
    }
}
