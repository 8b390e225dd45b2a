//! Client side of the control protocol, shared by `fshostctl` and `mount.fshost`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use fshost_protocol::{to_line, Request, Response};

pub mod table;

/// How long to wait for the daemon's answer before giving up (on top of a drain's timeout).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

pub fn answer_timeout(request: &Request) -> Duration {
    match request {
        Request::Unload {
            timeout_secs: Some(secs),
            ..
        } => ANSWER_TIMEOUT + Duration::from_secs(*secs),
        _ => ANSWER_TIMEOUT,
    }
}

/// Sends one request; errors here mean the daemon could not be reached or did not answer.
pub fn exchange(socket: &Path, request: &Request) -> Result<(Response, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach fshostd at {}: {e}\nstart the daemon (`sudo fshostd` or `systemctl start fshostd`), or point --socket / {} at its socket",
            socket.display(),
            fshost_protocol::SOCKET_ENV
        )
    })?;
    stream
        .set_read_timeout(Some(answer_timeout(request)))
        .map_err(|e| e.to_string())?;
    // A daemon that refuses the connection (a limit) answers at once and closes; the write
    // may then fail, but its answer is there to read and says why.
    let sent = stream.write_all(to_line(request).as_bytes());
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
    if line.is_empty() {
        return Err(match (sent, read) {
            (Err(e), _) => format!("cannot send the request to fshostd: {e}"),
            (_, Err(e)) => format!("fshostd did not answer: {e}"),
            _ => "fshostd closed the connection without answering".into(),
        });
    }
    let response = serde_json::from_str(&line)
        .map_err(|e| format!("fshostd sent an unreadable answer: {e}"))?;
    Ok((response, line))
}
