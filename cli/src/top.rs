//! `fshostctl top`: every mount with its request rate, errors, latency and bytes, sorted
//! by rate, refreshed every interval in a terminal view (ratatui), or printed once after
//! one interval (`--once`, for scripts). Keys: `q` quits; `r` rate, `e` errors, `l` p99
//! latency, `m` mount point sort.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use fshost_protocol::{MountStats, Reply, Request};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::Constraint;
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Row, Table};

/// What the rows are sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Rate,
    Errors,
    Latency,
    Mount,
}

/// One mount between two samples.
#[derive(Debug, Clone)]
pub struct Line {
    pub mountpoint: String,
    pub plugin: String,
    pub generation: u32,
    pub rate: f64,
    pub error_rate: f64,
    pub p99_us: Option<u64>,
    pub read_per_sec: f64,
    pub written_per_sec: f64,
    pub in_flight: u64,
    pub waiting: Option<u64>,
}

/// Requests, errors and latency buckets of a mount, all operations summed.
pub fn sums(m: &MountStats) -> (u64, u64, Vec<u64>) {
    let mut buckets = vec![0u64; fshost_protocol::LATENCY_BUCKETS_US.len() + 1];
    let (mut count, mut errors) = (0, 0);
    for op in &m.ops {
        count += op.count;
        errors += op.error_count();
        for (sum, n) in buckets.iter_mut().zip(&op.buckets) {
            *sum += n;
        }
    }
    (count, errors, buckets)
}

/// The lines for `now`, with rates against `before` (taken `secs` earlier); p99 is over
/// the requests between the two samples.
pub fn lines(before: &[MountStats], now: &[MountStats], secs: f64, key: SortKey) -> Vec<Line> {
    let secs = secs.max(1e-3);
    let mut lines: Vec<Line> = now
        .iter()
        .map(|m| {
            let (count, errors, buckets) = sums(m);
            let earlier = before.iter().find(|b| b.mountpoint == m.mountpoint);
            let (count0, errors0, buckets0) =
                earlier.map_or_else(|| (0, 0, vec![0; buckets.len()]), sums);
            let (read0, written0) = earlier.map_or((0, 0), |b| (b.bytes_read, b.bytes_written));
            let window: Vec<u64> = buckets
                .iter()
                .zip(&buckets0)
                .map(|(n, n0)| n.saturating_sub(*n0))
                .collect();
            Line {
                mountpoint: m.mountpoint.clone(),
                plugin: m.plugin.clone(),
                generation: m.generation,
                rate: count.saturating_sub(count0) as f64 / secs,
                error_rate: errors.saturating_sub(errors0) as f64 / secs,
                p99_us: fshost_protocol::quantile_us(&window, 0.99),
                read_per_sec: m.bytes_read.saturating_sub(read0) as f64 / secs,
                written_per_sec: m.bytes_written.saturating_sub(written0) as f64 / secs,
                in_flight: m.in_flight,
                waiting: m.waiting,
            }
        })
        .collect();
    sort(&mut lines, key);
    lines
}

fn sort(lines: &mut [Line], key: SortKey) {
    let by = |a: f64, b: f64| b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal);
    match key {
        SortKey::Rate => {
            lines.sort_by(|a, b| by(a.rate, b.rate).then(a.mountpoint.cmp(&b.mountpoint)))
        }
        SortKey::Errors => lines
            .sort_by(|a, b| by(a.error_rate, b.error_rate).then(a.mountpoint.cmp(&b.mountpoint))),
        SortKey::Latency => lines.sort_by(|a, b| {
            b.p99_us
                .cmp(&a.p99_us)
                .then(a.mountpoint.cmp(&b.mountpoint))
        }),
        SortKey::Mount => lines.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint)),
    }
}

const HEADER: [&str; 10] = [
    "MOUNTPOINT",
    "PLUGIN",
    "GEN",
    "REQ/S",
    "ERR/S",
    "P99",
    "READ/S",
    "WRITE/S",
    "IN FLIGHT",
    "WAITING",
];

fn cells(line: &Line) -> [String; 10] {
    let per_sec = |bytes: f64| match bytes {
        b if b >= (1 << 20) as f64 => format!("{:.1} MiB", b / (1 << 20) as f64),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        b => format!("{b:.0} B"),
    };
    [
        line.mountpoint.clone(),
        line.plugin.clone(),
        line.generation.to_string(),
        format!("{:.0}", line.rate),
        format!("{:.0}", line.error_rate),
        match line.p99_us {
            None => "-".into(),
            Some(us) if us < 1000 => format!("≤{us} µs"),
            Some(us) => format!("≤{:.0} ms", us as f64 / 1000.0),
        },
        per_sec(line.read_per_sec),
        per_sec(line.written_per_sec),
        line.in_flight.to_string(),
        line.waiting.map_or_else(|| "-".into(), |n| n.to_string()),
    ]
}

/// The lines as a plain table (`--once`).
pub fn text(lines: &[Line]) -> String {
    crate::table::render(&HEADER, lines.iter().map(|l| cells(l).to_vec()))
}

/// One sample of every mount's statistics.
pub fn sample(socket: &Path) -> Result<Vec<MountStats>, String> {
    let (response, _) =
        crate::exchange(socket, &Request::Stats { filter: None }).map_err(|e| e.to_string())?;
    match (response.result, response.error) {
        (Some(Reply::Stats { mounts }), _) => Ok(mounts),
        (_, Some(error)) => Err(format!("{} ({})", error.message, error.code)),
        _ => Err("fshostd answered something else than statistics".into()),
    }
}

/// The live view, until `q` (or Esc, or Ctrl-C).
pub fn live(socket: &Path, interval: Duration, mut key: SortKey) -> Result<(), String> {
    let mut terminal = ratatui::init();
    let shown = (|| -> Result<(), String> {
        let mut before = sample(socket)?;
        let mut taken = Instant::now();
        let mut lines = lines(&before, &before, 1.0, key);
        let mut status = String::from("collecting…");
        loop {
            terminal
                .draw(|frame| {
                    let rows = lines.iter().map(|l| Row::new(cells(l).to_vec()));
                    let widths = [
                        Constraint::Fill(3),
                        Constraint::Fill(1),
                        Constraint::Length(4),
                        Constraint::Length(8),
                        Constraint::Length(7),
                        Constraint::Length(9),
                        Constraint::Length(10),
                        Constraint::Length(10),
                        Constraint::Length(10),
                        Constraint::Length(8),
                    ];
                    let title = format!(
                        " fshost top — {} mounts, sorted by {key:?} — {status} — q quit, r/e/l/m sort ",
                        lines.len()
                    );
                    let table = Table::new(rows, widths)
                        .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD)))
                        .block(Block::bordered().title(title));
                    frame.render_widget(table, frame.area());
                })
                .map_err(|e| format!("cannot draw: {e}"))?;
            let left = interval.saturating_sub(taken.elapsed());
            if event::poll(left).map_err(|e| e.to_string())? {
                if let Event::Key(press) = event::read().map_err(|e| e.to_string())? {
                    if press.kind != KeyEventKind::Press {
                        continue;
                    }
                    let ctrl_c = press.code == KeyCode::Char('c')
                        && press.modifiers.contains(event::KeyModifiers::CONTROL);
                    match press.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        _ if ctrl_c => return Ok(()),
                        KeyCode::Char('r') => key = SortKey::Rate,
                        KeyCode::Char('e') => key = SortKey::Errors,
                        KeyCode::Char('l') => key = SortKey::Latency,
                        KeyCode::Char('m') => key = SortKey::Mount,
                        _ => {}
                    }
                    sort(&mut lines, key);
                }
                continue;
            }
            let now = sample(socket)?;
            let secs = taken.elapsed().as_secs_f64();
            lines = self::lines(&before, &now, secs, key);
            status = format!("every {:.1} s", interval.as_secs_f64());
            before = now;
            taken = Instant::now();
        }
    })();
    ratatui::restore();
    shown
}

/// Two samples `interval` apart, as text.
pub fn once(socket: &Path, interval: Duration, key: SortKey) -> Result<String, String> {
    let before = sample(socket)?;
    let taken = Instant::now();
    std::thread::sleep(interval);
    let now = sample(socket)?;
    Ok(text(&lines(
        &before,
        &now,
        taken.elapsed().as_secs_f64(),
        key,
    )))
}

/// Whether standard output is a terminal the live view can use.
pub fn interactive() -> bool {
    use std::io::IsTerminal;
    io::stdout().is_terminal()
}
