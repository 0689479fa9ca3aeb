//! Start-up of the real binary with bad settings: it must stop before any work, name the setting, keep
//! secrets out of the message and exit with the configuration exit code (2).

use std::process::{Command, Output};

const BINARY: &str = env!("CARGO_BIN_EXE_optout-rule-evaluator");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BINARY);
    command.args(args);
    // Only what the test sets: a developer's OPTOUT_* variables must not leak in.
    for (name, _) in std::env::vars() {
        if name.starts_with("OPTOUT_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("the binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_missing_admin_token_stops_start_up_naming_the_setting() {
    let output = run(&[], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--admin-token"),
        "{}",
        stderr(&output)
    );
    assert!(
        output.stdout.is_empty(),
        "announced an address before failing"
    );
}

#[test]
fn a_malformed_url_stops_start_up_naming_the_setting_without_the_password() {
    let output = run(
        &["--admin-token", "t"],
        &[("OPTOUT_AMQP_URL", "amqp//guest:hunter2@127.0.0.1:5672")],
    );
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("invalid OPTOUT_AMQP_URL"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn an_admin_token_file_and_a_config_file_are_layered_and_checked() {
    let dir = std::env::temp_dir().join(format!("optout-evaluator-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token = dir.join("token");
    std::fs::write(&token, "from-a-secret\n").expect("token file");
    let config = dir.join("evaluator.toml");
    std::fs::write(&config, "database_url = \"postgres//nohost\"\n").expect("config file");
    // The token comes from the file, so start-up gets as far as the file's bad database URL.
    let output = run(
        &["--config", &config.display().to_string()],
        &[("OPTOUT_ADMIN_TOKEN_FILE", &token.display().to_string())],
    );
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("invalid OPTOUT_DATABASE_URL"), "{text}");
    // The environment sits above the file: a good URL there wins.
    std::fs::write(&config, "prefetch = \"lots\"\n").expect("config file");
    let output = run(
        &[
            "--config",
            &config.display().to_string(),
            "--admin-token",
            "t",
        ],
        &[],
    );
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("--prefetch"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
