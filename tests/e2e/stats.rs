//! Per-mount statistics (`fshostctl stats`, `fshostctl metrics`): exact counts after
//! scripted operations, errors by errno, histograms that add up, a Prometheus exposition
//! that parses, counters that live through a plugin upgrade (split per generation), `top
//! --once`, per-plugin sums, and the example Grafana dashboard's series.

use std::collections::BTreeMap;
use std::fs;

use serde_json::Value;

use fshost_tests::{fuse_available, Env};

use crate::path_str;

/// The one mount's operations from `stats --json`, by name.
fn ops(env: &Env, mountpoint: &str) -> (Value, BTreeMap<String, Value>) {
    let answer = env.ctl(&["--json", "stats", mountpoint]).ok().json();
    let mounts = answer["mounts"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .clone();
    assert_eq!(mounts.len(), 1, "{answer}");
    let ops = mounts[0]["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| (op["op"].as_str().unwrap().to_string(), op.clone()))
        .collect();
    (mounts[0].clone(), ops)
}

fn count(ops: &BTreeMap<String, Value>, op: &str) -> u64 {
    ops.get(op).map_or(0, |o| o["count"].as_u64().unwrap())
}

/// One sample of the text exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus's text format strictly enough to catch what a scraper would refuse:
/// every sample belongs to a family declared by `# TYPE` before it, labels are
/// `key="value"` with escapes, values are numbers.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut families = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| families.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(families.contains_key(family), "no TYPE before {line}");
        let mut parsed = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").expect("key=\"");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().expect("closing quote") {
                    (_, '\\') => value.push(chars.next().expect("escaped").1),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            parsed.insert(key.to_string(), value);
            rest = after[end + 1..]
                .strip_prefix(',')
                .unwrap_or(&after[end + 1..]);
        }
        samples.push(Sample {
            name: name.to_string(),
            labels: parsed,
            value,
        });
    }
    samples
}

#[test]
fn every_call_is_counted_by_operation_errno_and_latency() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("m");
    let at = path_str(&mnt);
    // memfs serving its reads and writes itself (by default they pass it by).
    env.ctl(&["mount", "memfs", at, "-o", "nopassthrough"]).ok();
    let (_, before) = ops(&env, at);
    for i in 0..100 {
        fs::write(mnt.join(format!("f{i}")), b"12345").unwrap();
    }
    for i in 0..50 {
        assert!(fs::metadata(mnt.join(format!("missing{i}"))).is_err());
    }
    let (mount, after) = ops(&env, at);
    assert_eq!(
        count(&after, "create_file") - count(&before, "create_file"),
        100
    );
    assert_eq!(count(&after, "write") - count(&before, "write"), 100);
    assert_eq!(mount["bytes_written"], 500, "{mount}");
    let enoent = |ops: &BTreeMap<String, Value>| {
        ops.get("lookup")
            .and_then(|o| o["errors"]["ENOENT"].as_u64())
            .unwrap_or(0)
    };
    // One lookup per missing name (the 100 creates looked their names up first, too).
    assert_eq!(enoent(&after) - enoent(&before), 150);
    for (name, op) in &after {
        let buckets: u64 = op["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(buckets, op["count"].as_u64().unwrap(), "{name}: {op}");
    }
    assert_eq!(mount["in_flight"], 0);

    // The exposition says the same, and adds up.
    let text = env.ctl(&["metrics", at]).ok().stdout;
    let samples = parse_exposition(&text);
    let find = |name: &str, op: &str, extra: Option<(&str, &str)>| {
        samples
            .iter()
            .filter(|s| s.name == name && s.labels.get("op").map(String::as_str) == Some(op))
            .filter(|s| extra.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
            .map(|s| s.value)
            .collect::<Vec<f64>>()
    };
    assert_eq!(
        find("fshost_requests_total", "create_file", None),
        [count(&after, "create_file") as f64]
    );
    assert_eq!(
        find(
            "fshost_request_errors_total",
            "lookup",
            Some(("errno", "ENOENT"))
        ),
        [enoent(&after) as f64]
    );
    for op in after.keys() {
        let buckets = find("fshost_request_duration_seconds_bucket", op, None);
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{op}: {buckets:?}"
        );
        let inf = find(
            "fshost_request_duration_seconds_bucket",
            op,
            Some(("le", "+Inf")),
        );
        assert_eq!(inf, find("fshost_request_duration_seconds_count", op, None));
        // A daemon another test starts meanwhile probes every fshost mount it finds with a
        // statfs (is its server gone?): that count may have grown since.
        if op != "statfs" {
            assert_eq!(inf, [count(&after, op) as f64], "{op}");
        }
    }
    assert!(samples
        .iter()
        .all(|s| s.labels.get("mountpoint").map(String::as_str) == Some(at)));

    // The table, as a person reads it.
    let table = env.ctl(&["stats", at, "--interval", "0"]).ok().stdout;
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("MOUNTPOINT"), "{table}");
    assert!(
        header.contains("P99") && header.contains("WAITING"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("lookup") && l.contains("ENOENT")),
        "{table}"
    );

    // The counters belong to the mount: they live on through an upgrade of its plugin.
    env.ctl(&["upgrade", "memfs"]).ok();
    let (mount, upgraded) = ops(&env, at);
    assert_eq!(mount["generation"], 2);
    assert!(count(&upgraded, "create_file") >= count(&after, "create_file"));
    let out = env.ctl(&["stats", "no-such-plugin"]);
    assert_eq!(out.code, 1, "{out:?}");
    env.ctl(&["unmount", at]).ok();
}

/// `metrics_listen` serves the exposition over HTTP to a real scrape; other paths 404.
#[test]
fn the_metrics_endpoint_answers_a_scrape() {
    if !fuse_available() {
        return;
    }
    use std::io::{Read, Write};
    let env = Env::start_configured(&[], "metrics_listen = \"127.0.0.1:0\"\n");
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("m");
    env.ctl(&["mount", "memfs", path_str(&mnt), "-o", "nopassthrough"])
        .ok();
    fs::write(mnt.join("f"), b"x").unwrap();
    let log = env.log_text();
    let address = log
        .lines()
        .find(|l| l.contains("serving Prometheus metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    let answer = get("/metrics");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let samples = parse_exposition(body);
    assert!(
        samples.iter().any(|s| s.name == "fshost_requests_total"
            && s.labels.get("op").map(String::as_str) == Some("create_file")
            && s.value >= 1.0),
        "{body}"
    );
    assert!(get("/other").starts_with("HTTP/1.1 404"));
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

/// `--log-format json` (or FSHOST_LOG_FORMAT=json): every log line is one JSON object.
#[test]
fn json_logs_are_one_object_per_line() {
    if !fuse_available() {
        return;
    }
    let env = Env::start_with(&[("FSHOST_LOG_FORMAT", "json")]);
    env.ctl(&["load", "memfs"]).ok();
    let log = env.log_text();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.is_empty()) {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
        lines += 1;
    }
    assert!(log.contains("plugin loaded"), "{log}");
    assert!(lines >= 2, "{log}");
}

/// `-o nostats` records nothing (it exists to measure what recording costs).
#[test]
fn a_nostats_mount_records_nothing() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "memfs"]).ok();
    let mnt = env.mountpoint("quiet");
    env.ctl(&["mount", "memfs", path_str(&mnt), "-o", "nostats"])
        .ok();
    fs::write(mnt.join("f"), b"x").unwrap();
    let (mount, ops) = ops(&env, path_str(&mnt));
    assert!(ops.is_empty(), "{mount}");
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn counters_go_on_through_an_upgrade_and_split_by_generation() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "faultfs"]).ok();
    let mnt = env.mountpoint("f");
    env.ctl(&["mount", "faultfs", path_str(&mnt), "-o", "attr_timeout=0"])
        .ok();
    let data = mnt.join("data");
    for _ in 0..10 {
        fs::read(&data).unwrap();
    }
    let (_, before) = ops(&env, path_str(&mnt));
    let next = fshost_tests::artifact("libfaultfs_next.so");
    env.ctl(&["upgrade", "faultfs", path_str(&next)]).ok();
    for _ in 0..5 {
        fs::read(&data).unwrap();
    }
    let (mount, after) = ops(&env, path_str(&mnt));
    // The counters went on: ten reads before, five after.
    assert_eq!(count(&before, "read"), 10, "{mount}");
    assert_eq!(count(&after, "read"), 15, "{mount}");
    let total: u64 = after.values().map(|o| o["count"].as_u64().unwrap()).sum();
    let generations = mount["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 2, "{mount}");
    assert_eq!(generations[0]["generation"], 1);
    assert_eq!(generations[1]["generation"], 2);
    let first: u64 = before.values().map(|o| o["count"].as_u64().unwrap()).sum();
    let by_generation: Vec<u64> = generations
        .iter()
        .map(|g| g["requests"].as_u64().unwrap())
        .collect();
    // Generation 1 served everything counted before the upgrade (the stats request
    // itself reaches no plugin), and at most the statfs calls since (other tests'
    // daemons, starting, statfs every fshost mount); generation 2 the rest.
    let statfs = count(&after, "statfs") - count(&before, "statfs");
    assert!(
        (first..=first + statfs).contains(&by_generation[0]),
        "{mount}"
    );
    assert_eq!(by_generation[0] + by_generation[1], total, "{mount}");
    assert!(by_generation[1] >= 5, "{mount}");
    // The table shows the split, and the exposition carries it.
    let text = env
        .ctl(&["stats", path_str(&mnt), "--interval", "0"])
        .ok()
        .stdout;
    assert!(text.contains("GENERATION"), "{text}");
    let metrics = env.ctl(&["metrics"]).ok().stdout;
    let samples = parse_exposition(&metrics);
    let split: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "fshost_generation_requests_total")
        .collect();
    assert_eq!(split.len(), 2, "{metrics}");
    // Against the same exposition's totals (a late flush may have come in meanwhile).
    let requests: u64 = samples
        .iter()
        .filter(|s| s.name == "fshost_requests_total")
        .map(|s| s.value as u64)
        .sum();
    assert_eq!(
        split.iter().map(|s| s.value as u64).sum::<u64>(),
        requests,
        "{metrics}"
    );
    // The example Grafana dashboard asks only for series the exposition has.
    let dashboard = fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/grafana-dashboard.json"),
    )
    .unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard).unwrap();
    let declared: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("fshost_") {
                    let family = format!("fshost_{}", name.trim_end_matches("_bucket"));
                    assert!(declared.contains(&family.as_str()), "{family} in {expr}");
                    asked += 1;
                }
            }
        }
    }
    assert!(asked >= 8, "the dashboard asks for {asked} series");
    env.ctl(&["unmount", path_str(&mnt)]).ok();
}

#[test]
fn top_once_lists_the_busiest_mount_first_and_stats_sums_per_plugin() {
    if !fuse_available() {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "memfs"]).ok();
    let (busy, idle) = (env.mountpoint("busy"), env.mountpoint("idle"));
    env.ctl(&["mount", "memfs", path_str(&busy)]).ok();
    env.ctl(&["mount", "memfs", path_str(&idle)]).ok();
    fs::write(busy.join("f"), b"x").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (stop, file) = (std::sync::Arc::clone(&stop), busy.join("f"));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = fs::metadata(&file);
                let _ = fs::read(&file);
            }
        })
    };
    let out = env.ctl(&["top", "--once", "--interval", "1"]).ok().stdout;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    worker.join().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("MOUNTPOINT"), "{out}");
    for column in ["REQ/S", "ERR/S", "P99", "READ/S", "IN FLIGHT", "WAITING"] {
        assert!(lines[0].contains(column), "{column}: {out}");
    }
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].starts_with(path_str(&busy)),
        "busiest first: {out}"
    );
    assert!(lines[2].starts_with(path_str(&idle)), "{out}");
    let rate = |line: &str| -> f64 { line.split_whitespace().nth(3).unwrap().parse().unwrap() };
    assert!(rate(lines[1]) > 10.0, "{out}");
    // Not quite zero: other tests' daemons, starting, statfs every fshost mount.
    assert!(rate(lines[2]) < rate(lines[1]) / 10.0, "{out}");
    // Sorted by mount point on request.
    let out = env
        .ctl(&["top", "--once", "--interval", "0.1", "--sort", "mount"])
        .ok()
        .stdout;
    assert!(
        out.lines().nth(1).unwrap().starts_with(path_str(&busy)),
        "{out}"
    );
    // stats sums the mounts per plugin.
    let text = env.ctl(&["stats", "--interval", "0"]).ok().stdout;
    let summary = text
        .lines()
        .skip_while(|l| !l.starts_with("PLUGIN"))
        .nth(1)
        .unwrap_or_else(|| panic!("{text}"));
    let fields: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(fields[0], "memfs", "{text}");
    assert_eq!(fields[2], "2", "two mounts: {text}");
    for mnt in [&busy, &idle] {
        env.ctl(&["unmount", path_str(mnt)]).ok();
    }
}

/// The kernel's queue of a mount (`waiting`: requests queued or being served, from
/// fusectl) is shown whether or not fusectl is mounted on the host: fshostd mounts its own,
/// attached nowhere, if it must (this machine has none at `/sys/fs/fuse/connections`).
#[test]
fn the_kernels_queue_of_a_mount_is_shown() {
    if !fuse_available() || !fshost_tests::tool_available("dd") {
        return;
    }
    let env = Env::start();
    env.ctl(&["load", "faultfs"]).ok();
    let mnt = env.mountpoint("slow");
    let at = path_str(&mnt);
    env.ctl(&["mount", "faultfs", at, "-o", "slow_ms=1000,threads=1"])
        .ok();
    let (mount, _) = ops(&env, at);
    assert_eq!(mount["waiting"], 0, "{mount}");
    // Three slow reads, one served at a time: the other two wait in the kernel.
    let mut readers: Vec<_> = (0..3)
        .map(|_| fshost_tests::direct_read(&mnt.join("data"), None))
        .collect();
    let mut most = 0;
    fshost_tests::eventually(std::time::Duration::from_secs(2), || {
        let (mount, _) = ops(&env, at);
        most = most.max(mount["waiting"].as_u64().unwrap_or(0));
        most >= 3
    });
    for reader in &mut readers {
        let done = fshost_tests::wait_with_deadline(reader, std::time::Duration::from_secs(10));
        assert!(done.is_some_and(|s| s.success()));
    }
    // (Other tests' daemons may add a statfs of every fshost mount now and then.)
    assert!(most >= 3, "at most {most} requests seen waiting");
    let (mount, _) = ops(&env, at);
    assert_eq!(mount["waiting"], 0, "{mount}");
    env.ctl(&["unmount", at]).ok();
}
