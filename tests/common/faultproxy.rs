//! A fault-injecting HTTP proxy in front of a real OpenBao: every request is forwarded unchanged
//! unless a rule matches it, in which case the rule's fault happens instead (or after forwarding).
//! This is how tests make a real Vault look slow, flaky, sealed or half-applied without faking
//! its API: the answers that do arrive are always OpenBao's own.
//!
//! One request per connection (`Connection: close` on every answer), plain HTTP, loopback only.
//! Rules are tried in order; a rule with `times = Some(n)` fires n times and then is spent.
//! Every request is logged with the status the client got (0 when it got none).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What a matching rule does to a request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer `status` with a Vault-style `{"errors": [message]}` body; Vault never sees it.
    Status(u16, String),
    /// As `Status`, after holding the request this long: a busy Vault that refuses slowly.
    SlowStatus(Duration, u16, String),
    /// Forward to Vault (so a write is applied), then answer `status` anyway: the client
    /// believes the write failed although it happened.
    ForwardThenStatus(u16, String),
    /// Read the request, then never answer (the connection stays open until the proxy stops).
    Stall,
    /// Forward, then send only the first half of Vault's answer and reset the connection.
    ResetMidResponse,
    /// Close the connection without reading or answering.
    Drop,
    /// Answer 503 as a sealed Vault does.
    Sealed,
    /// Answer `status` (301/302/307/308) with `Location: <to>` + the request's path and query.
    Redirect(u16, String),
    /// Forward unchanged (to let the first of several matching requests through).
    Forward,
    /// Forward, then replace the answer's `Date` header with the proxy's own clock shifted by
    /// this many seconds (negative: Vault's clock looks behind, i.e. ours looks fast).
    ShiftDate(i64),
    /// Hold the request this long, then forward it and relay Vault's answer: a slow but
    /// successful request (`Delay(Duration::ZERO)` passes one request through a counted rule).
    /// The request reaches Vault after the delay even if the client gave up meanwhile.
    Delay(Duration),
    /// Forward the request at once (Vault applies or answers it now), then hold Vault's answer
    /// this long before relaying it: what the client learns is older than Vault's state.
    DelayAnswer(Duration),
}

/// A rule: requests whose method matches (any when `None`) and whose path (with query) contains
/// `path` get `fault`, `times` times (forever when `None`).
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: Option<String>,
    pub path: String,
    pub fault: Fault,
    pub times: Option<usize>,
}

impl Rule {
    pub fn new(method: Option<&str>, path: &str, fault: Fault, times: Option<usize>) -> Rule {
        Rule {
            method: method.map(str::to_string),
            path: path.to_string(),
            fault,
            times,
        }
    }
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lower-cased header names with their values.
    pub headers: Vec<(String, String)>,
    /// The status the client received (0: none — stalled, dropped or reset).
    pub status: u16,
    /// Whether the request reached Vault.
    pub forwarded: bool,
}

struct State {
    rules: Vec<Rule>,
    seen: Vec<Seen>,
}

/// A running proxy; stops (and releases stalled connections) on drop.
pub struct FaultProxy {
    pub addr: String,
    pub port: u16,
    upstream: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream` (`http://127.0.0.1:P`).
    pub fn start(upstream: &str) -> FaultProxy {
        Self::start_on("127.0.0.1", upstream)
    }

    /// Starts a proxy on a free port of the given loopback address (e.g. `127.0.0.2`, to stand
    /// for "another host").
    pub fn start_on(ip: &str, upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind((ip, 0)).expect("bind fault proxy");
        let port = listener.local_addr().unwrap().port();
        let upstream_hostport = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let state = Arc::new(Mutex::new(State {
            rules: Vec::new(),
            seen: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop, up) = (state.clone(), stop.clone(), upstream_hostport.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (state, stop, up) = (state.clone(), stop.clone(), up.clone());
                    thread::spawn(move || handle(conn, &up, &state, &stop));
                }
            });
        }
        FaultProxy {
            addr: format!("http://{ip}:{port}"),
            port,
            upstream: upstream_hostport,
            state,
            stop,
        }
    }

    /// Adds a rule after the existing ones.
    pub fn add(&self, rule: Rule) {
        self.state.lock().unwrap().rules.push(rule);
    }

    /// Shorthand: `fault` for requests whose path contains `path`, any method, `times` times.
    pub fn on(&self, path: &str, fault: Fault, times: Option<usize>) {
        self.add(Rule::new(None, path, fault, times));
    }

    /// Removes every rule: from now on everything is forwarded.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// How many requests with this method (any when `None`) had a path containing `path`.
    pub fn count(&self, method: Option<&str>, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| method.is_none_or(|m| s.method == m) && s.path.contains(path))
            .count()
    }

    /// The upstream `host:port`.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr.trim_start_matches("http://"));
    }
}

struct Request {
    method: String,
    path: String,
    head: Vec<u8>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut head = line.clone().into_bytes();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            // Forward our own Connection header instead of the client's.
            if k != "connection" {
                head.extend_from_slice(h.as_bytes());
            }
            headers.push((k, v));
        }
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        head,
        headers,
        body,
    })
}

fn forward(up: &str, req: &Request) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(up).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    s.write_all(&req.head).ok()?;
    s.write_all(&req.body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(out)
}

fn status_of(resp: &[u8]) -> u16 {
    std::str::from_utf8(&resp[..resp.len().min(64)])
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn answer(status: u16, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} Fault\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `resp` with its `Date` header (added if missing) set to now + `shift` seconds.
fn with_date(resp: &[u8], shift: i64) -> Vec<u8> {
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(resp.len());
    let head = String::from_utf8_lossy(&resp[..split]);
    let when = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(shift);
    let date = jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&when)
        .expect("date in range");
    let mut out = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        if i > 0 && line.to_ascii_lowercase().starts_with("date:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
        if i == 0 {
            out.push_str(&format!("Date: {date}\r\n"));
        }
    }
    let mut bytes = out.into_bytes();
    bytes.truncate(bytes.len() - 2);
    bytes.extend_from_slice(&resp[split..]);
    bytes
}

fn errors_body(message: &str) -> String {
    serde_json::json!({ "errors": [message] }).to_string()
}

fn handle(mut conn: TcpStream, up: &str, state: &Mutex<State>, stop: &AtomicBool) {
    let Some(req) = read_request(&conn) else {
        return;
    };
    // Logged on arrival (status 0 until answered), so a test can see a stalled request.
    let index = {
        let mut st = state.lock().unwrap();
        st.seen.push(Seen {
            method: req.method.clone(),
            path: req.path.clone(),
            headers: req.headers.clone(),
            status: 0,
            forwarded: false,
        });
        st.seen.len() - 1
    };
    let fault = {
        let mut st = state.lock().unwrap();
        let i = st.rules.iter().position(|r| {
            r.method.as_deref().is_none_or(|m| m == req.method) && req.path.contains(&r.path)
        });
        i.map(|i| {
            let f = st.rules[i].fault.clone();
            if let Some(n) = st.rules[i].times.as_mut() {
                *n -= 1;
                if *n == 0 {
                    st.rules.remove(i);
                }
            }
            f
        })
    };
    let mut forwarded = false;
    let status = match fault {
        None | Some(Fault::Forward) => match forward(up, &req) {
            Some(resp) => {
                forwarded = true;
                let _ = conn.write_all(&resp);
                status_of(&resp)
            }
            None => 0,
        },
        Some(Fault::Status(s, m)) => {
            let _ = conn.write_all(&answer(s, "", &errors_body(&m)));
            s
        }
        Some(Fault::SlowStatus(d, s, m)) => {
            thread::sleep(d);
            let _ = conn.write_all(&answer(s, "", &errors_body(&m)));
            s
        }
        Some(Fault::ForwardThenStatus(s, m)) => {
            forwarded = forward(up, &req).is_some();
            let _ = conn.write_all(&answer(s, "", &errors_body(&m)));
            s
        }
        Some(Fault::Sealed) => {
            let _ = conn.write_all(&answer(503, "", &errors_body("Vault is sealed")));
            503
        }
        Some(Fault::Redirect(s, to)) => {
            let loc = format!("Location: {}{}\r\n", to.trim_end_matches('/'), req.path);
            let _ = conn.write_all(&answer(s, &loc, ""));
            s
        }
        Some(Fault::ShiftDate(secs)) => match forward(up, &req) {
            Some(resp) => {
                forwarded = true;
                let _ = conn.write_all(&with_date(&resp, secs));
                status_of(&resp)
            }
            None => 0,
        },
        Some(Fault::Drop) => 0,
        Some(Fault::ResetMidResponse) => {
            if let Some(resp) = forward(up, &req) {
                forwarded = true;
                let _ = conn.write_all(&resp[..resp.len() / 2]);
            }
            0
        }
        Some(Fault::Delay(d)) => {
            thread::sleep(d);
            match forward(up, &req) {
                Some(resp) => {
                    forwarded = true;
                    let _ = conn.write_all(&resp);
                    status_of(&resp)
                }
                None => 0,
            }
        }
        Some(Fault::DelayAnswer(d)) => match forward(up, &req) {
            Some(resp) => {
                forwarded = true;
                thread::sleep(d);
                let _ = conn.write_all(&resp);
                status_of(&resp)
            }
            None => 0,
        },
        Some(Fault::Stall) => {
            while !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(100));
            }
            0
        }
    };
    if let Some(s) = state.lock().unwrap().seen.get_mut(index) {
        s.status = status;
        s.forwarded = forwarded;
    }
    let _ = conn.shutdown(Shutdown::Both);
}
