//! Configuration in layers, lowest first: the defaults in each service's `clap` definition, an optional
//! file (`--config FILE` or `OPTOUT_CONFIG`; TOML, or JSON when the name ends in `.json`), the
//! environment (`OPTOUT_*`, and `OPTOUT_*_FILE` naming a file that holds the value, as a Kubernetes
//! Secret volume provides), then command-line flags.
//!
//! File keys are the flag names (`amqp-url`, `amqp_url`) or the variable names (`OPTOUT_AMQP_URL`); an
//! unknown key is an error. Every value passes through clap's own parsing, so a bad value in any layer
//! gets the same message naming the flag. A service exits with [`EXIT_CONFIG`] on any of these errors,
//! and with [`EXIT_FAILURE`] when it fails later at run time.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Arg;

/// Exit code for an invalid or incomplete configuration (as clap uses for usage errors).
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure after start-up.
pub const EXIT_FAILURE: u8 = 1;
/// Prefix of every environment variable.
pub const ENV_PREFIX: &str = "OPTOUT_";
/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "OPTOUT_CONFIG";

/// TLS on the gRPC port, flattened into each service's configuration.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct GrpcTls {
    /// PEM certificate chain for TLS on the gRPC port (with `--grpc-tls-key`); plaintext when unset.
    #[arg(long, env = "OPTOUT_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key for `--grpc-tls-cert`.
    #[arg(long, env = "OPTOUT_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) of the clients: with it, the gRPC port asks every caller for a
    /// certificate signed by one of them (mutual TLS), health probes included.
    #[arg(long, env = "OPTOUT_GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_tls_client_ca: Option<PathBuf>,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// clap refused the arguments, the environment or a file value (or help/version was asked for).
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// A setting is invalid; the message names it and never carries a secret value.
    #[error("invalid {setting}: {message}")]
    Invalid {
        /// The setting, as its environment variable or file key.
        setting: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// An invalid setting.
    pub fn invalid(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            setting: setting.into(),
            message: message.into(),
        }
    }

    /// The process exit code: 0 for `--help`/`--version`, [`EXIT_CONFIG`] otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Clap(error) if !error.use_stderr() => 0,
            _ => EXIT_CONFIG,
        }
    }

    /// Prints the error (or the help text) the way the user expects and returns the exit code.
    pub fn report(&self, program: &str) -> std::process::ExitCode {
        match self {
            Self::Clap(error) => {
                let _ = error.print();
            }
            Self::Invalid { .. } => eprintln!("{program}: {self}"),
        }
        std::process::ExitCode::from(self.exit_code())
    }
}

/// Gives `arg` a value from a file as its default. A value from a file counts as given, so the
/// arg is no longer required, not even conditionally (`required_unless_present`, as the services'
/// `--migrate-only` uses: clap's check of those ignores defaults).
fn supplied(arg: Arg, value: String) -> Arg {
    arg.default_value(value)
        .required(false)
        .required_unless_present(clap::builder::Resettable::Reset)
}

/// Loads `C` from the process's arguments, environment and optional file.
pub fn load<C: clap::Parser>() -> Result<C, ConfigError> {
    load_from(std::env::args_os(), |name| std::env::var(name).ok())
}

/// Loads `C` from `args` (program name first). `env` looks up the variables this layer reads itself
/// (`OPTOUT_CONFIG`, `*_FILE`); clap reads the others from the process environment.
pub fn load_from<C, I, T>(args: I, env: impl Fn(&str) -> Option<String>) -> Result<C, ConfigError>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = C::command().arg(
        Arg::new("config")
            .long("config")
            .env(CONFIG_ENV)
            .value_name("FILE")
            .help("Settings file (TOML, or JSON by extension) below the environment and flags"),
    );
    if let Some(path) = config_path(&args, &env) {
        for (key, value) in read_file(&path)? {
            let id = arg_id(&command, &key).ok_or_else(|| {
                ConfigError::invalid(
                    key.clone(),
                    format!("unknown setting in {}", path.display()),
                )
            })?;
            command = command.mut_arg(id, |arg| supplied(arg, value));
        }
    }
    // `OPTOUT_X_FILE` holds the path of a file with the value of `OPTOUT_X` (a mounted Secret); `OPTOUT_X`
    // itself wins when both are set.
    let from_files: Vec<(String, String)> = command
        .get_arguments()
        .filter_map(|arg| {
            let name = arg.get_env()?.to_str()?.to_owned();
            Some((arg.get_id().to_string(), name))
        })
        .filter(|(_, name)| env(name).is_none())
        .filter_map(|(id, name)| {
            let file_variable = format!("{name}_FILE");
            env(&file_variable).map(|path| (id, file_variable, path))
        })
        .map(|(id, file_variable, path)| {
            let contents = std::fs::read_to_string(&path).map_err(|error| {
                ConfigError::invalid(file_variable, format!("cannot read {path}: {error}"))
            })?;
            Ok((id, contents.trim_end_matches(['\r', '\n']).to_owned()))
        })
        .collect::<Result<_, ConfigError>>()?;
    for (id, value) in from_files {
        command = command.mut_arg(id, |arg| supplied(arg, value));
    }
    let matches = command.try_get_matches_from(args)?;
    Ok(C::from_arg_matches(&matches)?)
}

/// Checks that `value` is a URL with one of `schemes`; the message names `setting` but never shows the
/// value, which may carry a password.
pub fn check_url(setting: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let url = url::Url::parse(value)
        .map_err(|error| ConfigError::invalid(setting, format!("not a URL ({error})")))?;
    if !schemes.contains(&url.scheme()) {
        return Err(ConfigError::invalid(
            setting,
            format!(
                "scheme {:?} is not one of {}",
                url.scheme(),
                schemes.join(", ")
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(setting, "the URL has no host"));
    }
    Ok(())
}

fn config_path(args: &[OsString], env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    env(CONFIG_ENV)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

/// The flat key/value pairs of a settings file; lists become comma-separated values.
fn read_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::invalid(
            CONFIG_ENV,
            format!("cannot read {}: {error}", path.display()),
        )
    })?;
    let malformed =
        |error: String| ConfigError::invalid(CONFIG_ENV, format!("{}: {error}", path.display()));
    let table: serde_json::Map<String, serde_json::Value> = if path
        .extension()
        .is_some_and(|extension| extension == "json")
    {
        serde_json::from_str(&text).map_err(|error| malformed(error.to_string()))?
    } else {
        let table: toml::Table =
            toml::from_str(&text).map_err(|error| malformed(error.to_string()))?;
        serde_json::to_value(table)
            .ok()
            .and_then(|value| value.as_object().cloned())
            .ok_or_else(|| malformed("not a table".to_owned()))?
    };
    table
        .into_iter()
        .map(|(key, value)| {
            let text = scalar(&value).ok_or_else(|| {
                ConfigError::invalid(
                    key.clone(),
                    format!(
                        "{}: expected a string, number, boolean or list",
                        path.display()
                    ),
                )
            })?;
            Ok((key, text))
        })
        .collect()
}

fn scalar(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Number(number) => Some(number.to_string()),
        serde_json::Value::Bool(flag) => Some(flag.to_string()),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| match item {
                serde_json::Value::Array(_) => None,
                other => scalar(other),
            })
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        serde_json::Value::Null | serde_json::Value::Object(_) => None,
    }
}

/// The argument a file key names: `amqp-url`, `amqp_url` or `OPTOUT_AMQP_URL` all name `amqp_url`.
fn arg_id(command: &clap::Command, key: &str) -> Option<String> {
    let normalized = key.trim().to_ascii_lowercase().replace('-', "_");
    let normalized = normalized
        .strip_prefix(&ENV_PREFIX.to_ascii_lowercase())
        .unwrap_or(&normalized)
        .to_owned();
    command
        .get_arguments()
        .find(|arg| {
            arg.get_id().as_str() != "config"
                && (arg.get_id().as_str() == normalized
                    || arg
                        .get_long()
                        .is_some_and(|long| long.replace('-', "_") == normalized))
        })
        .map(|arg| arg.get_id().to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Sample {
        #[arg(long, env = "OPTOUT_TEST_SAMPLE_URL", default_value = "amqp://default")]
        amqp_url: String,
        #[arg(long, env = "OPTOUT_TEST_SAMPLE_TOKEN")]
        admin_token: String,
        #[arg(long, env = "OPTOUT_TEST_SAMPLE_PREFETCH", default_value_t = 20)]
        prefetch: u16,
        #[arg(long, env = "OPTOUT_TEST_SAMPLE_AUDIENCES", value_delimiter = ',')]
        audiences: Vec<String>,
        #[command(flatten)]
        tls: GrpcTls,
    }

    fn temp_file(extension: &str, contents: &str) -> PathBuf {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "optout-service-{}-{}.{extension}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).expect("write temp file");
        path
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn file_values_sit_above_defaults_and_below_flags() {
        let file = temp_file(
            "toml",
            "amqp-url = \"amqp://file\"\nOPTOUT_ADMIN_TOKEN = \"t\"\nprefetch = 7\naudiences = [\"a\", \"b\"]\n",
        );
        let path = file.display().to_string();
        let sample: Sample =
            load_from(["x", "--config", &path, "--prefetch", "9"], no_env).expect("loads");
        assert_eq!(sample.amqp_url, "amqp://file");
        assert_eq!(sample.admin_token, "t");
        assert_eq!(sample.prefetch, 9);
        assert_eq!(sample.audiences, ["a", "b"]);
    }

    #[test]
    fn json_files_and_the_config_variable_work_too() {
        let file = temp_file("json", r#"{"admin_token": "j", "prefetch": 3}"#);
        let path = file.display().to_string();
        let sample: Sample =
            load_from(["x"], |name| (name == CONFIG_ENV).then(|| path.clone())).expect("loads");
        assert_eq!((sample.admin_token.as_str(), sample.prefetch), ("j", 3));
    }

    #[test]
    fn an_unknown_file_key_is_named_in_the_error() {
        let file = temp_file("toml", "admin_token = \"t\"\namqp_ulr = \"x\"\n");
        let path = file.display().to_string();
        let error = load_from::<Sample, _, _>(["x", "--config", &path], no_env).unwrap_err();
        assert_eq!(error.exit_code(), EXIT_CONFIG);
        assert!(error.to_string().contains("amqp_ulr"), "{error}");
    }

    #[test]
    fn a_bad_file_value_is_refused_by_clap_naming_the_flag() {
        let file = temp_file("toml", "admin_token = \"t\"\nprefetch = \"many\"\n");
        let path = file.display().to_string();
        let error = load_from::<Sample, _, _>(["x", "--config", &path], no_env).unwrap_err();
        assert_eq!(error.exit_code(), EXIT_CONFIG);
        assert!(error.to_string().contains("--prefetch"), "{error}");
    }

    #[test]
    fn a_secret_can_come_from_a_file_named_by_a_file_variable() {
        let secret = temp_file("txt", "from-secret-volume\n");
        let path = secret.display().to_string();
        let sample: Sample = load_from(["x"], |name| {
            (name == "OPTOUT_TEST_SAMPLE_TOKEN_FILE").then(|| path.clone())
        })
        .expect("loads");
        assert_eq!(sample.admin_token, "from-secret-volume");
    }

    #[test]
    fn a_missing_secret_stops_loading_with_the_config_exit_code() {
        let error = load_from::<Sample, _, _>(["x"], no_env).unwrap_err();
        assert_eq!(error.exit_code(), EXIT_CONFIG);
        assert!(error.to_string().contains("--admin-token"), "{error}");
    }

    #[test]
    fn url_checks_name_the_setting_and_hide_the_value() {
        let error = check_url(
            "OPTOUT_AMQP_URL",
            "amqp//user:hunter2@host",
            &["amqp", "amqps"],
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("invalid OPTOUT_AMQP_URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(check_url("OPTOUT_AMQP_URL", "http://host", &["amqp"]).is_err());
        assert!(
            check_url(
                "OPTOUT_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                &["amqp"]
            )
            .is_ok()
        );
    }
}
