//! A RabbitMQ node and a PostgreSQL cluster of a test's own, on ephemeral ports.
//!
//! The fault-injection test restarts the broker and the database while work is in flight. Doing
//! that to the machine's shared servers would break every other test and process using them (and
//! an abrupt restart of the shared broker has left it accepting TCP but never answering AMQP), so
//! that test runs its stack against these instead: the same RabbitMQ and PostgreSQL software,
//! started from the installed packages with their data in a temporary folder, stopped and removed
//! on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The servers run as their packages' users when the tests run as root (RabbitMQ's scripts switch
/// to `rabbitmq` by themselves; PostgreSQL refuses to run as root), so they must own the folder.
fn hand_over(dir: &Path, user: &str) -> Result<()> {
    if is_root() {
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:{user}"))
            .arg(dir))?;
    }
    Ok(())
}

fn run(command: &mut Command) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Waits until `ready` holds, or fails naming `what`.
fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{what} was not ready within {timeout:?}")
}

/// A fresh temporary folder, `optout-<label>-<pid>-<hex>`: the pid says whose it is.
fn scratch(label: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "optout-{label}-{}-{}",
        std::process::id(),
        optout_cli::up::random_hex(6)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The folders of servers whose test process is gone: a test killed for its time limit never
/// runs its drops, and its servers would run on.
fn orphans(label: &str) -> Vec<PathBuf> {
    let prefix = format!("optout-{label}-");
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let owner: u32 = name
                .strip_prefix(&prefix)?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            let alive = Path::new("/proc").join(owner.to_string()).exists();
            (!alive).then_some(path)
        })
        .collect()
}

/// A RabbitMQ node of its own: `optout-<hex>@localhost`, AMQP on an ephemeral port, no plugins.
#[derive(Debug)]
pub struct PrivateRabbit {
    node: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    server: Option<std::process::Child>,
}

impl PrivateRabbit {
    /// Starts the node and waits until it answers AMQP (first stopping the nodes of test
    /// processes that died without stopping theirs).
    pub fn start() -> Result<Self> {
        for orphan in orphans("rabbit") {
            if let Ok(node) = std::fs::read_to_string(orphan.join("node")) {
                drop(run(Command::new("rabbitmqctl").args([
                    "-q",
                    "-n",
                    node.trim(),
                    "stop",
                ])));
            }
            drop(std::fs::remove_dir_all(orphan));
        }
        let dir = scratch("rabbit")?;
        let node = format!("optout-{}@localhost", optout_cli::up::random_hex(6));
        std::fs::write(dir.join("node"), &node)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        hand_over(&dir, "rabbitmq")?;
        let mut rabbit = Self {
            node,
            port: free_port()?,
            dist_port: free_port()?,
            dir,
            server: None,
        };
        rabbit.boot()?;
        Ok(rabbit)
    }

    /// The URL services connect to.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn boot(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.out"))?;
        let server = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            // Not the machine's rabbitmq.conf, which binds the shared node's port.
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("no-config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting rabbitmq-server (is RabbitMQ installed? scripts/services.sh)")?;
        self.server = Some(server);
        let port = self.port;
        wait_for(
            &format!("the private RabbitMQ node {}", self.node),
            Duration::from_secs(90),
            || amqp_answers(port),
        )
        .with_context(|| format!("its output is in {}", self.dir.display()))
    }

    fn stop(&mut self) -> Result<()> {
        let stopped = run(Command::new("rabbitmqctl").args(["-q", "-n", &self.node, "stop"]));
        if let Some(mut server) = self.server.take() {
            if stopped.is_err() {
                drop(server.kill());
            }
            drop(server.wait());
        }
        stopped
    }

    /// Stops the node (as a pod's broker stops: every connection closed) and starts it again on
    /// the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.boot()
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        drop(self.stop());
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

/// Whether something on `port` answers the AMQP protocol header with a frame.
fn amqp_answers(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(5));
    if stream.set_read_timeout(timeout).is_err()
        || stream.write_all(b"AMQP\x00\x00\x09\x01").is_err()
    {
        return false;
    }
    let mut frame_type = [0_u8; 1];
    // 1 is a method frame: the broker's Connection.Start.
    stream.read_exact(&mut frame_type).is_ok() && frame_type[0] == 1
}

/// A PostgreSQL cluster of its own, from the installed server binaries, on an ephemeral port.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
}

impl PrivatePostgres {
    /// Creates the cluster (`initdb`, trust authentication on loopback) and starts it (first
    /// stopping the clusters of test processes that died without stopping theirs).
    pub fn start() -> Result<Self> {
        let bin = postgres_bin()?;
        for orphan in orphans("postgres") {
            // Dropping stops the server and removes its folder.
            drop(Self {
                bin: bin.clone(),
                port: 0,
                dir: orphan,
            });
        }
        let dir = scratch("postgres")?;
        hand_over(&dir, "postgres")?;
        let postgres = Self {
            bin,
            port: free_port()?,
            dir,
        };
        postgres.ctl(
            Command::new(postgres.bin.join("initdb"))
                .arg("-D")
                .arg(postgres.data())
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
        )?;
        postgres.ctl(
            Command::new(postgres.bin.join("pg_ctl"))
                .arg("-D")
                .arg(postgres.data())
                .arg("-l")
                .arg(postgres.dir.join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
                    postgres.port,
                    postgres.dir.display()
                ))
                .args(["-w", "-t", "60", "start"]),
        )?;
        Ok(postgres)
    }

    /// The URL services connect to.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs a server tool as the `postgres` user when the tests run as root.
    fn ctl(&self, command: &mut Command) -> Result<()> {
        if is_root() {
            let program = command.get_program().to_owned();
            let args: Vec<_> = command.get_args().map(ToOwned::to_owned).collect();
            run(Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args))
        } else {
            run(command)
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        self.ctl(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(args),
        )
    }

    /// A fast shutdown (every session ended, as when the database pod restarts), then a start on
    /// the same data and options.
    pub fn restart(&self) -> Result<()> {
        // With its log file named: without one the new server would write to pg_ctl's output
        // and hold that pipe open, and waiting for pg_ctl would never end.
        let log = self.dir.join("server.log");
        let log = log.to_str().context("temporary folder is not UTF-8")?;
        self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "-l", log, "restart"])
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        drop(self.pg_ctl(&["-m", "immediate", "-w", "stop"]));
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

/// The newest installed server's `bin` folder (Debian keeps them in `/usr/lib/postgresql/<v>`).
fn postgres_bin() -> Result<PathBuf> {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed in /usr/lib/postgresql (scripts/services.sh)")?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|version| Some((version.parse::<u32>().ok()?, version)))
        .max()
        .context("no PostgreSQL version in /usr/lib/postgresql")?;
    Ok(Path::new("/usr/lib/postgresql").join(newest.1).join("bin"))
}
