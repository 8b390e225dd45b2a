//! Client side of the control protocol, shared by `fshostctl` and `mount.fshost`.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fshost_protocol::{to_line, Request, Response};

pub mod table;
pub mod top;

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

/// Why no answer came from the daemon.
#[derive(Debug)]
pub enum ExchangeError {
    Connect { socket: PathBuf, source: io::Error },
    Send(io::Error),
    NoAnswer(io::Error),
    Closed,
    Unreadable(serde_json::Error),
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Connect { socket, source } => write!(
                f,
                "cannot reach fshostd at {}: {source}\nstart the daemon (`sudo fshostd` or `systemctl start fshostd`), or point --socket / {} at its socket",
                socket.display(),
                fshost_protocol::SOCKET_ENV
            ),
            ExchangeError::Send(e) => write!(f, "cannot send the request to fshostd: {e}"),
            ExchangeError::NoAnswer(e) => write!(f, "fshostd did not answer: {e}"),
            ExchangeError::Closed => f.write_str("fshostd closed the connection without answering"),
            ExchangeError::Unreadable(e) => write!(f, "fshostd sent an unreadable answer: {e}"),
        }
    }
}

impl std::error::Error for ExchangeError {}

/// Sends one request; errors here mean the daemon could not be reached or did not answer.
pub fn exchange(socket: &Path, request: &Request) -> Result<(Response, String), ExchangeError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ExchangeError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(answer_timeout(request)))
        .map_err(ExchangeError::NoAnswer)?;
    // A daemon that refuses the connection (a limit) answers at once and closes; the write
    // may then fail, but its answer is there to read and says why.
    let sent = stream.write_all(to_line(request).as_bytes());
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
    if line.is_empty() {
        return Err(match (sent, read) {
            (Err(e), _) => ExchangeError::Send(e),
            (_, Err(e)) => ExchangeError::NoAnswer(e),
            _ => ExchangeError::Closed,
        });
    }
    let response = serde_json::from_str(&line).map_err(ExchangeError::Unreadable)?;
    Ok((response, line))
}
