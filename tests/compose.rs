//! `docker-compose.yml` and the `Dockerfile`, checked without a Docker
//! engine: the services are there, each long-running one has a healthcheck
//! that works, dependencies wait for health (or completion), and every
//! command given to the aom-terminator image parses as the binary would
//! parse it, with the service's environment. `docker compose config` runs
//! too where Docker is installed.

use aom_terminator::cli::{Cli, Command, parse_args_only};
use clap::CommandFactory;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const IMAGE: &str = "aom-terminator:local";
/// The services the README and the compose file's header promise.
const SERVICES: [&str; 5] = [
    "rabbitmq",
    "postgres",
    "sandbox",
    "terminator",
    "sample-batch",
];
/// Subcommands that do their work and exit.
const ONE_SHOT: [&str; 4] = ["migrate", "enqueue", "report", "dead-letters"];
/// Variables an aom-terminator service may set that are no flag.
const NOT_FLAGS: [&str; 1] = ["RUST_LOG"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text =
        std::fs::read_to_string(root().join("docker-compose.yml")).expect("docker-compose.yml");
    let mut doc: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is YAML");
    // `<<: *aom-terminator-image`, as Compose applies it.
    doc.apply_merge().expect("merge keys");
    doc
}

fn services(doc: &Value) -> BTreeMap<String, Value> {
    doc["services"]
        .as_mapping()
        .expect("a services mapping")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service name").to_owned(), v.clone()))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items.iter().map(scalar).collect(),
        Value::Null => Vec::new(),
        other => panic!("expected the exec (list) form, got {other:?}"),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn environment(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Mapping(m) => m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                let s = scalar(i);
                let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn is_ours(service: &Value) -> bool {
    service["image"].as_str() == Some(IMAGE)
}

/// The Dockerfile's ENTRYPOINT and CMD, exec form.
fn dockerfile() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let exec = |instruction: &str| -> Vec<String> {
        let line = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(instruction))
            .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"));
        serde_json::from_str(line.trim()).expect("exec form")
    };
    (exec("ENTRYPOINT "), exec("CMD "))
}

/// The argument list the binary gets in `service`: its command (or the
/// image's CMD), its environment turned into the flags it stands for.
fn argv(name: &str, service: &Value) -> Vec<String> {
    let (entrypoint, cmd) = dockerfile();
    let entrypoint = match &service["entrypoint"] {
        Value::Null => entrypoint,
        v => strings(v),
    };
    assert_eq!(
        entrypoint,
        ["aom-terminator"],
        "{name}: the entrypoint runs the binary"
    );
    let command = match &service["command"] {
        Value::Null => cmd,
        v => strings(v),
    };
    // The subcommand path (`dead-letters list`), checked against the tree.
    let root = Cli::command();
    let mut at = &root;
    let mut path = Vec::new();
    for word in command.iter().take_while(|w| !w.starts_with('-')) {
        if at.get_subcommands().next().is_none() {
            break;
        }
        at = at
            .find_subcommand(word)
            .unwrap_or_else(|| panic!("{name}: `{word}` is no subcommand of `{path:?}`"));
        path.push(word.clone());
    }
    assert!(!path.is_empty(), "{name}: no subcommand in {command:?}");
    let mut argv = vec!["aom-terminator".to_owned()];
    argv.extend(command.iter().cloned());
    let mut scopes = vec![&root];
    let mut node = &root;
    for word in &path {
        node = node.find_subcommand(word).expect("checked");
        scopes.push(node);
    }
    for (key, value) in environment(service) {
        let flag = scopes
            .iter()
            .flat_map(|c| c.get_arguments())
            .find(|a| a.get_env().is_some_and(|e| e == key.as_str()))
            .and_then(|a| a.get_long());
        match flag {
            Some(long) => argv.push(format!("--{long}={value}")),
            None => assert!(
                NOT_FLAGS.contains(&key.as_str()),
                "{name}: {key} is no setting of `aom-terminator {}`",
                path.join(" ")
            ),
        }
    }
    argv
}

fn subcommand(argv: &[String]) -> &str {
    &argv[1]
}

#[test]
fn the_expected_services_are_there() {
    let services = services(&compose());
    for want in SERVICES {
        assert!(services.contains_key(want), "no {want} service");
    }
    for name in ["sandbox", "terminator", "sample-batch"] {
        assert!(is_ours(&services[name]), "{name} runs {IMAGE}");
        assert_eq!(
            services[name]["build"]["context"].as_str(),
            Some("."),
            "{name} is built from this repository"
        );
    }
}

#[test]
fn every_command_of_the_image_parses_with_its_environment() {
    let services = services(&compose());
    let ours: Vec<_> = services.iter().filter(|(_, s)| is_ours(s)).collect();
    assert!(ours.len() >= 3, "{:?}", services.keys());
    for (name, service) in ours {
        let argv = argv(name, service);
        let cli: Cli = parse_args_only(&argv)
            .unwrap_or_else(|e| panic!("{name}: {argv:?} does not parse: {e}"));
        if let Command::Run(args) = cli.command {
            args.validate()
                .unwrap_or_else(|e| panic!("{name}: the daemon's settings: {e}"));
        }
        // A file named on the command line is mounted from the repository.
        for path in argv.iter().filter(|a| a.starts_with('/')) {
            let found = strings(&service["volumes"]).iter().any(|v| {
                let mut parts = v.split(':');
                let (host, inside) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                path.strip_prefix(inside).is_some_and(|rest| {
                    root()
                        .join(host)
                        .join(rest.trim_start_matches('/'))
                        .is_file()
                })
            });
            assert!(found, "{name}: {path} is not mounted from the repository");
        }
    }
    // The image's own default, `docker run aom-terminator`.
    let (entrypoint, cmd) = dockerfile();
    assert_eq!(entrypoint, ["aom-terminator"]);
    assert!(
        Cli::command().find_subcommand(&cmd[0]).is_some(),
        "CMD {cmd:?}"
    );
}

#[test]
fn long_running_services_have_healthchecks_and_dependencies_wait_for_them() {
    let services = services(&compose());
    let one_shot = |name: &str| {
        let s = &services[name];
        is_ours(s) && ONE_SHOT.contains(&subcommand(&argv(name, s)))
    };
    for (name, service) in &services {
        if one_shot(name) {
            let restart = service["restart"].as_str().unwrap_or("no");
            assert_eq!(restart, "no", "{name} is one-shot: not restarted");
            continue;
        }
        let check = &service["healthcheck"];
        let test = strings(&check["test"]);
        assert!(
            !test.is_empty() && test[0] != "NONE" && check["disable"].as_bool() != Some(true),
            "{name} runs for good and has no healthcheck"
        );
    }
    let mut waits = 0;
    for (name, service) in &services {
        let Some(deps) = service.get("depends_on") else {
            continue;
        };
        let deps = deps
            .as_mapping()
            .unwrap_or_else(|| panic!("{name}: depends_on in the long form, with conditions"));
        for (dep, how) in deps {
            let dep = dep.as_str().expect("name");
            assert!(services.contains_key(dep), "{name} depends on no {dep}");
            let want = if one_shot(dep) {
                "service_completed_successfully"
            } else {
                "service_healthy"
            };
            assert_eq!(
                how["condition"].as_str(),
                Some(want),
                "{name} must wait for {dep}"
            );
            waits += 1;
        }
    }
    let deps = |name: &str| -> Vec<String> {
        services[name]["depends_on"]
            .as_mapping()
            .map(|m| m.keys().map(scalar).collect())
            .unwrap_or_default()
    };
    for want in ["rabbitmq", "postgres", "sandbox"] {
        assert!(
            deps("terminator").iter().any(|d| d == want),
            "terminator waits for {want}"
        );
    }
    assert!(deps("sample-batch").iter().any(|d| d == "rabbitmq"));
    assert!(waits >= 4);
}

/// The healthchecks of the image are bash scripts speaking HTTP/1.0 over
/// /dev/tcp: run each against a stand-in server answering 200 (healthy) and
/// 503 (not), and the sandbox's against the real sandbox.
#[test]
fn the_image_healthchecks_tell_200_from_503() {
    if std::process::Command::new("bash")
        .arg("-c")
        .arg("exit 0")
        .status()
        .is_err()
    {
        eprintln!("skipped: no bash here to run the healthcheck scripts");
        return;
    }
    let services = services(&compose());
    let want = [("sandbox", "/_sandbox/stats"), ("terminator", "/readyz")];
    for (name, path) in want {
        let test = strings(&services[name]["healthcheck"]["test"]);
        assert_eq!(test[..3], ["CMD", "bash", "-c"], "{name}: {test:?}");
        let script = &test[3];
        let port = script
            .split("/dev/tcp/127.0.0.1/")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or_else(|| panic!("{name}: no port in {script}"));
        for (status, healthy) in [(200, true), (503, false)] {
            let server = TcpListener::bind("127.0.0.1:0").expect("bind");
            let local = server.local_addr().expect("addr").port();
            let answer = std::thread::spawn(move || {
                let (mut conn, _) = server.accept().expect("the healthcheck connects");
                let mut line = String::new();
                BufReader::new(&conn)
                    .read_line(&mut line)
                    .expect("request line");
                let _ = write!(conn, "HTTP/1.0 {status} X\r\ncontent-length: 0\r\n\r\n");
                line
            });
            let ran = run_bash(
                &script.replace(&format!("127.0.0.1/{port}"), &format!("127.0.0.1/{local}")),
            );
            let line = answer.join().expect("server");
            assert_eq!(line, format!("GET {path} HTTP/1.0\r\n"), "{name}");
            assert_eq!(ran, healthy, "{name} answering {status}");
        }
    }
    // The sandbox's check against the sandbox itself.
    let test = strings(&services["sandbox"]["healthcheck"]["test"]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let mut sandbox = std::process::Command::new(env!("CARGO_BIN_EXE_aom-terminator"))
        .args(["sandbox", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sandbox");
    let script = test[3].replace("127.0.0.1/8080", &format!("127.0.0.1/{port}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut healthy = false;
    while !healthy && Instant::now() < deadline {
        healthy = run_bash(&script);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    assert!(healthy, "the sandbox never passed its own healthcheck");
}

fn run_bash(script: &str) -> bool {
    std::process::Command::new("bash")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Compose's own reading of the file, where Docker is installed.
#[test]
fn docker_compose_config_accepts_the_file() {
    let version = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output();
    match version {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "skipped: `docker compose version` failed here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!(
                "skipped: no `docker` command here ({e}); the file is checked by the other tests"
            );
            return;
        }
    }
    let out = std::process::Command::new("docker")
        .args(["compose", "-f", "docker-compose.yml", "config", "--quiet"])
        .current_dir(root())
        .output()
        .expect("docker compose config");
    assert!(
        out.status.success(),
        "docker compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image's binary is the locked release build of this repository: the
/// last build in the builder stage is `cargo build --release --locked`, it
/// copies `target/release/aom-terminator`, and the runtime stage takes that
/// file from the builder (no second build, no other binary).
#[test]
fn the_image_runs_the_locked_release_build() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = text.lines().collect();
    let runtime_from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a runtime stage");
    let (builder, runtime) = lines.split_at(runtime_from);
    let last_build = builder
        .iter()
        .rposition(|l| l.contains("cargo build"))
        .expect("a cargo build in the builder stage");
    assert!(
        builder[last_build].contains("--release") && builder[last_build].contains("--locked"),
        "{}",
        builder[last_build]
    );
    assert!(
        builder[last_build..]
            .iter()
            .any(|l| l.contains("cp target/release/aom-terminator /usr/local/bin/aom-terminator")),
        "the release binary is what the builder keeps"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("COPY --from=builder /usr/local/bin/aom-terminator ")),
        "the runtime stage copies the builder's binary"
    );
    assert!(
        !runtime.iter().any(|l| l.contains("cargo ")),
        "nothing is built in the runtime stage"
    );
}
