//! Child processes that announce themselves with one JSON line on stdout: started, watched,
//! stopped gently (SIGTERM, then SIGKILL after a grace period) or killed outright.

use std::{
    collections::VecDeque,
    fmt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::{Child, Command},
    task::JoinHandle,
};

use crate::{Error, Result};

/// Lines of stderr kept per child for error messages.
const TAIL_LINES: usize = 40;

/// How to start one child.
#[derive(Clone)]
pub struct ChildSpec {
    /// Name used in log prefixes and errors, e.g. `fetcher` or `rule-evaluator#2`.
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Variables set on top of the inherited environment.
    pub env: Vec<(String, String)>,
    /// Copy the child's stderr (and stdout after the first line) to ours, prefixed with `[name]`.
    pub forward_output: bool,
    /// Also append every line of the child's stderr (its logs) to this file.
    pub log_file: Option<PathBuf>,
}

impl fmt::Debug for ChildSpec {
    // The environment carries secrets: show names only.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("program", &self.program)
            .field("args", &self.args)
            .field(
                "env",
                &self.env.iter().map(|(key, _)| key).collect::<Vec<_>>(),
            )
            .field("forward_output", &self.forward_output)
            .field("log_file", &self.log_file)
            .finish()
    }
}

/// The folder the binaries are in: `OPTOUT_BIN_DIR`, else the folder of the running executable.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("OPTOUT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        context: "cannot locate the running executable".to_owned(),
        source,
    })?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// `dir/program`, or an error that says how to build it.
pub fn find_binary(dir: &Path, program: &str) -> Result<PathBuf> {
    let path = dir.join(program);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            program: program.to_owned(),
            dir: dir.display().to_string(),
        })
    }
}

type Tail = Arc<Mutex<VecDeque<String>>>;

/// A started child that has printed its announcement.
#[derive(Debug)]
pub struct RunningChild {
    name: String,
    child: Child,
    announcement: serde_json::Value,
    tail: Tail,
    // Reader tasks end by themselves at end of file, when the child exits.
    _readers: Vec<JoinHandle<()>>,
}

fn push_tail(tail: &Tail, line: String) {
    let mut lines = tail
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if lines.len() == TAIL_LINES {
        lines.pop_front();
    }
    lines.push_back(line);
}

fn spawn_reader<R>(
    name: String,
    reader: R,
    tail: Option<Tail>,
    forward: bool,
    mut log: Option<tokio::fs::File>,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if forward {
                eprintln!("[{name}] {line}");
            }
            if let Some(file) = &mut log
                && file
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
            {
                // A full disk must not stop the child: keep reading, stop copying.
                log = None;
            }
            if let Some(tail) = &tail {
                push_tail(tail, line);
            }
        }
    })
}

impl RunningChild {
    /// Starts the child and waits up to `timeout` for its first stdout line, a JSON object.
    /// The child gets SIGKILL when this value is dropped, and SIGTERM if this process dies.
    pub async fn start(spec: &ChildSpec, timeout: Duration) -> Result<Self> {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Children must not outlive a crashed or killed supervisor.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            child: spec.name.clone(),
            source,
        })?;
        let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let log = match &spec.log_file {
            Some(path) => Some(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| Error::Io {
                        context: format!("cannot open log file {}", path.display()),
                        source,
                    })?,
            ),
            None => None,
        };
        let mut readers = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            readers.push(spawn_reader(
                spec.name.clone(),
                stderr,
                Some(tail.clone()),
                spec.forward_output,
                log,
            ));
        }
        let Some(stdout) = child.stdout.take() else {
            return Err(Error::Announce {
                child: spec.name.clone(),
                reason: "no stdout pipe".to_owned(),
                stderr_tail: String::new(),
            });
        };
        let mut stdout = BufReader::new(stdout);
        let mut first_line = String::new();
        let read = tokio::time::timeout(timeout, stdout.read_line(&mut first_line)).await;
        let failure = match read {
            Err(_) => Some(format!("no line on stdout within {}s", timeout.as_secs())),
            Ok(Err(error)) => Some(format!("cannot read its stdout: {error}")),
            Ok(Ok(0)) => Some("it closed stdout without a line (did it exit?)".to_owned()),
            Ok(Ok(_)) => None,
        };
        let announcement = match failure {
            None => serde_json::from_str::<serde_json::Value>(first_line.trim())
                .map_err(|error| format!("first line is not JSON ({error}): {first_line:?}")),
            Some(reason) => Err(reason),
        };
        match announcement {
            Ok(announcement) => {
                // Keep draining stdout so the child never blocks on a full pipe.
                readers.push(spawn_reader(
                    spec.name.clone(),
                    stdout,
                    None,
                    spec.forward_output,
                    None,
                ));
                Ok(Self {
                    name: spec.name.clone(),
                    child,
                    announcement,
                    tail,
                    _readers: readers,
                })
            }
            Err(mut reason) => {
                drop(child.start_kill());
                if let Ok(Ok(status)) =
                    tokio::time::timeout(Duration::from_secs(5), child.wait()).await
                {
                    reason = format!("{reason}; exit status {status}");
                }
                // Let the stderr reader reach end of file so the tail is complete.
                for reader in readers {
                    drop(tokio::time::timeout(Duration::from_secs(2), reader).await);
                }
                Err(Error::Announce {
                    child: spec.name.clone(),
                    reason,
                    stderr_tail: tail_text(&tail),
                })
            }
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JSON object it printed first.
    pub fn announcement(&self) -> &serde_json::Value {
        &self.announcement
    }

    /// A string field of the announcement (e.g. `grpc`), empty when absent.
    pub fn field(&self, key: &str) -> String {
        self.announcement
            .get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    /// Its process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines of its stderr.
    pub fn stderr_tail(&self) -> String {
        tail_text(&self.tail)
    }

    /// Waits for it to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        self.child.wait().await.map_err(|source| Error::Io {
            context: format!("cannot wait for {}", self.name),
            source,
        })
    }

    /// Whether it has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends a signal (no-op once it has exited).
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|pid| libc::pid_t::try_from(pid).ok())
        {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            _ => self.kill().await,
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        drop(self.child.start_kill());
        self.wait().await
    }

    /// An error that says this child exited with `status`.
    pub fn exited_error(&self, status: ExitStatus) -> Error {
        Error::ChildExited {
            child: self.name.clone(),
            status: status.to_string(),
            stderr_tail: self.stderr_tail(),
        }
    }
}

fn tail_text(tail: &Tail) -> String {
    let lines = tail
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    lines.iter().cloned().collect::<Vec<_>>().join("\n")
}
