//! Test harness: real RabbitMQ and Postgres, a sandbox API per test, and the
//! daemon run in-process (or as the real binary) against its own queues and
//! its own database, so tests run in parallel without seeing each other.
//!
//! The services come from `AMQP_URL` and `DATABASE_URL`. Where those are
//! unset and a Docker engine is reachable, testcontainers starts both;
//! otherwise the local defaults are used. Logs show with `TEST_LOG=1`.

#![allow(dead_code)] // not every test binary uses every helper

use aom_terminator::broker::{
    dead_letter_queue_arguments, declare_topology, request_queue_arguments,
};
// The daemon in-process gets exactly the flags a test gives it: its
// settings' environment variables (CLOUD_SDK_AK, RATE_LIMIT, ... in the
// developer's shell) are not read.
use aom_terminator::cli::{Cli, Command, parse_args_only};
use aom_terminator::sandbox::{RunningSandbox, Sandbox, SandboxArgs};
use aom_terminator::settings::{DaemonConfig, LogFormat, RunArgs};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection, PgPool};
use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::Child;
use tokio::sync::{OnceCell, oneshot};

pub const PROJECT: &str = "0123456789abcdef0123456789abcdef";
pub const TOKEN: &str = "test-token-7f3a9c";

struct Services {
    amqp_url: String,
    database_url: String,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();

fn docker_available() -> bool {
    std::env::var_os("DOCKER_HOST").is_some()
        || std::path::Path::new("/var/run/docker.sock").exists()
}

async fn services() -> &'static Services {
    SERVICES
        .get_or_init(|| async {
            let amqp = std::env::var("AMQP_URL").ok().filter(|s| !s.is_empty());
            let db = std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty());
            match (amqp, db) {
                (Some(amqp_url), Some(database_url)) => Services {
                    amqp_url,
                    database_url,
                },
                (amqp, db) if docker_available() => containers(amqp, db).await,
                (amqp, db) => Services {
                    amqp_url: amqp
                        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
                    database_url: db.unwrap_or_else(|| {
                        "postgres://postgres@127.0.0.1:5432/postgres".to_owned()
                    }),
                },
            }
        })
        .await
}

/// Start whichever service the environment did not name. The containers
/// live as long as the test process (testcontainers' reaper removes them).
async fn containers(amqp: Option<String>, db: Option<String>) -> Services {
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    let amqp_url = match amqp {
        Some(url) => url,
        None => {
            let c = testcontainers_modules::rabbitmq::RabbitMq::default()
                .start()
                .await
                .expect("start a RabbitMQ container");
            let port = c.get_host_port_ipv4(5672).await.expect("RabbitMQ port");
            std::mem::forget(c);
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        }
    };
    let database_url = match db {
        Some(url) => url,
        None => {
            let c = testcontainers_modules::postgres::Postgres::default()
                .start()
                .await
                .expect("start a Postgres container");
            let port = c.get_host_port_ipv4(5432).await.expect("Postgres port");
            std::mem::forget(c);
            format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres")
        }
    };
    Services {
        amqp_url,
        database_url,
    }
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        aom_terminator::telemetry::init(
            LogFormat::Text,
            &[
                aom_terminator::broker::QUIET_LOGS,
                aom_terminator::audit::QUIET_LOGS,
                aom_terminator::aom::QUIET_LOGS,
            ],
        );
    }
}

/// One test's world: its own queues, its own database, its own sandbox.
pub struct TestEnv {
    pub amqp_url: String,
    pub database_url: String,
    pub queue: String,
    pub dead_letter_queue: String,
    pub db: PgPool,
    pub sandbox: RunningSandbox,
    channel: Channel,
    _connection: Connection,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_sandbox(SandboxArgs::default()).await
    }

    pub async fn with_sandbox(args: SandboxArgs) -> Self {
        init_logs();
        let services = services().await;
        let name = format!("aomt_{:016x}", fastrand::u64(..));
        let mut admin = PgConnection::connect(&services.database_url)
            .await
            .expect("connect to Postgres");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let database_url = with_database(&services.database_url, &name);
        let db = PgPool::connect(&database_url)
            .await
            .expect("connect to the test database");
        let connection = Connection::connect(&services.amqp_url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let sandbox = Sandbox::new(&args)
            .bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("start the sandbox");
        let env = Self {
            amqp_url: services.amqp_url.clone(),
            database_url,
            queue: format!("{name}.requests"),
            dead_letter_queue: format!("{name}.dead"),
            db,
            sandbox,
            channel,
            _connection: connection,
        };
        // Declared by the test too, so messages can wait before the daemon starts.
        declare_topology(&env.channel, &env.daemon_config(&[]).amqp)
            .await
            .expect("declare the test queues");
        env
    }

    /// The daemon's settings for this test: its queues, database and
    /// sandbox, quick retries, plus `extra` flags.
    pub fn run_args(&self, extra: &[&str]) -> RunArgs {
        self.run_args_with_auth(&["--aom-auth-token", TOKEN], extra)
    }

    /// Like `run_args`, with `auth` flags instead of the test token.
    pub fn run_args_with_auth(&self, auth: &[&str], extra: &[&str]) -> RunArgs {
        let mut argv: Vec<String> = [
            "aom-terminator",
            "run",
            "--amqp-url",
            &self.amqp_url,
            "--database-url",
            &self.database_url,
            "--aom-endpoint",
            &self.sandbox.base_url(),
            "--terminate-queue",
            &self.queue,
            "--dead-letter-queue",
            &self.dead_letter_queue,
            "--backoff-initial-ms",
            "10",
            "--backoff-max-ms",
            "50",
            "--max-attempts",
            "3",
            // Tests run many daemons at once; those that scrape pass an address.
            "--metrics-addr",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(auth.iter().map(|s| s.to_string()));
        argv.extend(extra.iter().map(|s| s.to_string()));
        let cli: Cli = parse_args_only(argv).expect("test arguments parse");
        match cli.command {
            Command::Run(args) => *args,
            _ => panic!("not a run command"),
        }
    }

    pub fn daemon_config(&self, extra: &[&str]) -> DaemonConfig {
        self.run_args(extra).validate().expect("valid test config")
    }

    /// Run the daemon in-process until the handle is stopped or dropped.
    pub fn start_daemon(&self, extra: &[&str]) -> Daemon {
        self.start_daemon_with_auth(&["--aom-auth-token", TOKEN], extra)
    }

    pub fn start_daemon_with_auth(&self, auth: &[&str], extra: &[&str]) -> Daemon {
        let cfg = self
            .run_args_with_auth(auth, extra)
            .validate()
            .expect("valid test config");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(aom_terminator::daemon::run(cfg, async move {
            let _ = stopped.await;
        }));
        Daemon {
            stop: Some(stop),
            task,
        }
    }

    /// Environment for the real binary, matching `run_args`.
    pub fn binary_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.binary_env_without_auth();
        env.push(("AOM_AUTH_TOKEN", TOKEN.to_owned()));
        env
    }

    pub fn binary_env_without_auth(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AMQP_URL", self.amqp_url.clone()),
            ("DATABASE_URL", self.database_url.clone()),
            ("AOM_ENDPOINT", self.sandbox.base_url()),
            ("TERMINATE_QUEUE", self.queue.clone()),
            ("DEAD_LETTER_QUEUE", self.dead_letter_queue.clone()),
            ("BACKOFF_INITIAL_MS", "10".to_owned()),
            ("BACKOFF_MAX_MS", "50".to_owned()),
            ("MAX_ATTEMPTS", "3".to_owned()),
            ("METRICS_ADDR", "off".to_owned()),
        ]
    }

    /// Publish a message (confirmed) to the request queue.
    pub async fn publish(&self, body: &str, message_id: Option<&str>) {
        self.publish_bytes(body.as_bytes(), message_id).await;
    }

    pub async fn publish_bytes(&self, body: &[u8], message_id: Option<&str>) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            confirm.is_ack() && confirm.take_message().is_none(),
            "publish not routed"
        );
    }

    /// The name of this test's database.
    pub fn database_name(&self) -> String {
        self.database_url
            .rsplit('/')
            .next()
            .and_then(|s| s.split('?').next())
            .unwrap_or_default()
            .to_owned()
    }

    /// A pool on the server's admin database (not this test's).
    pub async fn admin_pool(&self) -> PgPool {
        PgPool::connect(&services().await.database_url)
            .await
            .expect("admin connection")
    }

    /// Another channel on the test's broker connection.
    pub async fn channel(&self) -> Channel {
        self._connection.create_channel().await.expect("channel")
    }

    /// Declare the request queue again with another `x-delivery-limit`.
    pub async fn set_delivery_limit(&self, limit: u32) {
        self.channel
            .queue_delete(self.queue.as_str().into(), Default::default())
            .await
            .expect("delete the queue");
        let limit = limit.to_string();
        declare_topology(
            &self.channel,
            &self.daemon_config(&["--delivery-limit", &limit]).amqp,
        )
        .await
        .expect("redeclare");
    }

    /// (ready, consumers) of a queue.
    async fn queue_state(&self, queue: &str, args: FieldTable) -> (u32, u32) {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("passive declare");
        (q.message_count(), q.consumer_count())
    }

    /// Messages ready in the request queue (not counting unacked ones).
    pub async fn ready_requests(&self) -> u32 {
        let args = request_queue_arguments(&self.daemon_config(&[]).amqp);
        self.queue_state(&self.queue, args).await.0
    }

    /// Requests waiting in the parking queue (their project is held).
    pub async fn parked_requests(&self) -> u32 {
        let queue = format!("{}.parked", self.queue);
        self.queue_state(&queue, dead_letter_queue_arguments())
            .await
            .0
    }

    /// Take every message from the dead-letter queue: (headers, body).
    pub async fn drain_dead_letters(&self) -> Vec<(FieldTable, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(msg) = self
            .channel
            .basic_get(
                self.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            let headers = msg
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            out.push((headers, msg.delivery.data));
        }
        out
    }

    /// The audit adapter on the test database.
    pub fn audit(&self) -> aom_terminator::audit::Audit {
        let settings = aom_terminator::settings::DatabaseArgs {
            database_url: self.database_url.clone().into(),
        }
        .settings()
        .expect("test database settings");
        aom_terminator::audit::Audit::new(&settings, 1).expect("audit")
    }

    /// Apply the audit migrations, as the daemon does at start (`enqueue`
    /// records its campaign in a table they create).
    pub async fn migrate(&self) {
        self.audit()
            .migrate()
            .await
            .expect("migrate the test database");
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn outcomes(&self) -> i64 {
        // Before the daemon migrates, the table does not exist yet.
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM termination_outcomes")
            .fetch_one(&self.db)
            .await
            .unwrap_or(0)
    }

    /// Poll until `n` requests have a final outcome.
    /// Poll until `request_id` has its final outcome (before the daemon
    /// migrates, the table does not exist yet: that counts as none).
    pub async fn wait_outcome_of(&self, request_id: &str) {
        eventually(&format!("an outcome for {request_id}"), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM termination_outcomes WHERE request_id = $1",
            )
            .bind(request_id)
            .fetch_one(&self.db)
            .await
            .unwrap_or(0)
                == 1
        })
        .await;
    }

    pub async fn wait_outcomes(&self, n: i64) {
        eventually(&format!("{n} final outcomes"), || async {
            self.outcomes().await >= n
        })
        .await;
        assert_eq!(self.outcomes().await, n, "more outcomes than requests");
    }

    pub async fn outcome_of(&self, request_id: &str) -> OutcomeRow {
        sqlx::query_as::<_, OutcomeRow>(
            "SELECT outcome, http_status, error_code, error_msg, attempts, skipped_redeliveries \
             FROM termination_outcomes WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_one(&self.db)
        .await
        .unwrap_or_else(|e| panic!("outcome of {request_id}: {e}"))
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct OutcomeRow {
    pub outcome: String,
    pub http_status: Option<i32>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub attempts: i32,
    pub skipped_redeliveries: i32,
}

/// Leave the broker and the server as we found them: hundreds of leftover
/// quorum queues slow RabbitMQ down for every later run.
impl Drop for TestEnv {
    fn drop(&mut self) {
        let amqp_url = self.amqp_url.clone();
        let queues = [
            self.queue.clone(),
            self.dead_letter_queue.clone(),
            format!("{}.parked", self.queue),
        ];
        let admin_url = with_database(&self.database_url, "postgres");
        let database = self.database_name();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(conn) =
                    Connection::connect(&amqp_url, ConnectionProperties::default()).await
                    && let Ok(channel) = conn.create_channel().await
                {
                    for q in queues {
                        let _ = channel
                            .queue_delete(q.as_str().into(), Default::default())
                            .await;
                    }
                    let _ = conn.close(200, "test done".into()).await;
                }
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

pub struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Signal shutdown and wait for a clean exit.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("daemon stops within a minute")
            .expect("daemon task")
            .expect("daemon result");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Poll `check` until it holds, or fail after a generous deadline. Tests
/// assert outcomes, never how long they took.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_for(what, Duration::from_secs(90), check).await;
}

/// `eventually`, with a limit of its own.
pub async fn eventually_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

pub fn request(request_id: &str, execution_id: &str) -> String {
    serde_json::json!({
        "request_id": request_id,
        "project_id": PROJECT,
        "workflow_id": "wf-test",
        "execution_id": execution_id,
        "reason": "test",
        "requested_by": "tests",
    })
    .to_string()
}

/// `n` single-request messages `{prefix}{i}`, each with its own execution.
pub async fn publish_singles(env: &TestEnv, prefix: &str, n: usize) {
    for i in 0..n {
        let id = format!("{prefix}{i}");
        env.publish(&request(&id, &format!("ex-{id}")), None).await;
    }
}

/// A local address nobody listens on right now.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// GET `url` (on loopback: never through a proxy in the shell): (status,
/// body).
pub async fn http_get(url: &str) -> (u16, String) {
    let client = reqwest::Client::builder().no_proxy().build();
    let answer = match client {
        Ok(client) => client.get(url).send().await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

pub fn batch(elements: &[String]) -> String {
    format!(r#"{{"requests":[{}]}}"#, elements.join(","))
}

pub fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

/// The real binary, with none of the settings of the developer's shell.
pub fn binary() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_aom-terminator"));
    // Only what each test sets: no stray settings from the developer's shell.
    for var in aom_terminator::cli::env_names() {
        cmd.env_remove(var);
    }
    // Logging and the proxies the HTTP client reads, as a shell may hold them.
    for var in [
        "RUST_LOG",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.kill_on_drop(true);
    cmd
}

pub async fn output(mut child: Child) -> (Option<i32>, String) {
    let mut stderr = child.stderr.take().expect("stderr piped");
    let mut stdout = child.stdout.take().expect("stdout piped");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits within a minute")
        .expect("wait");
    let (mut out, mut err) = (String::new(), String::new());
    let _ = stdout.read_to_string(&mut out).await;
    let _ = stderr.read_to_string(&mut err).await;
    (status.code(), out + &err)
}

/// Run `aom-terminator run` with `vars` (and nothing else from the shell):
/// it must exit 2 with one line that says `want` and shows no `secret`.
pub async fn assert_refused_in_one_line(vars: &[(&str, &str)], want: &str, secret: &str) {
    assert_run_refused(vars, want, secret).await;
}

/// `assert_refused_in_one_line` for settings given as owned pairs (a base
/// such as `TestEnv::binary_env`, then overrides: the last one wins).
pub async fn assert_run_refused<K: AsRef<str>, V: AsRef<str>>(
    vars: &[(K, V)],
    want: &str,
    secret: &str,
) {
    let shown: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
    let child = binary()
        .arg("run")
        .envs(shown.iter().copied())
        .spawn()
        .expect("spawn");
    let (code, out) = output(child).await;
    assert_eq!(code, Some(2), "{shown:?}: {out}");
    assert_eq!(
        out.trim().lines().count(),
        1,
        "one line for {shown:?}: {out}"
    );
    assert!(out.contains(want), "{shown:?} should say {want}: {out}");
    assert!(!out.contains("panicked") && !out.contains(secret), "{out}");
}

/// SIGTERM `child` and wait for it: its exit code and output.
pub async fn terminate(child: Child) -> (Option<i32>, String) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    output(child).await
}

/// How many requests ended `succeeded`.
pub async fn succeeded(env: &TestEnv) -> i64 {
    env.count("SELECT count(*) FROM termination_outcomes WHERE outcome = 'succeeded'")
        .await
}

/// `report --format json` with `args`, through the binary.
pub async fn report_json(env: &TestEnv, args: &[&str]) -> serde_json::Value {
    report_json_with(env, args, &[]).await
}

/// The same, with `vars` over the test's settings.
pub async fn report_json_with(
    env: &TestEnv,
    args: &[&str],
    vars: &[(&str, &str)],
) -> serde_json::Value {
    let mut cmd = binary();
    cmd.args(["report", "--format", "json"])
        .args(args)
        .envs(env.binary_env_without_auth())
        .envs(vars.iter().copied());
    let (code, out) = output(cmd.spawn().expect("spawn report")).await;
    assert_eq!(code, Some(0), "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The value of the metric line starting `name` in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
}
