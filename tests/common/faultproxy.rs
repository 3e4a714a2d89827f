//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1, put in front of the tests' S3 server to make
//! it throttle (503 SlowDown, 429), answer slowly, or drop connections, switchable while a test
//! runs. It decides per request, not per connection: it reads each request whole (its head, then
//! a `Content-Length` body or a chunked one; object_store sends `Content-Length` on every S3 PUT,
//! chunked is parsed all the same) before choosing what to do with it.
//!
//! Each forwarded request goes over a fresh upstream connection, read back by its framing
//! (`Content-Length`, chunked, none for HEAD/204/304, else until the server closes): simpler
//! than pooling, and the client side still keeps its connection alive between requests, as a
//! real endpoint would, except where a fault closes it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Forward it and pass the answer back.
    Pass = 0,
    /// Answer `503 Slow Down` with S3's `SlowDown` error XML and `Connection: close`, without
    /// forwarding.
    SlowDown = 1,
    /// Answer `429 Too Many Requests` and `Connection: close`, without forwarding.
    TooMany = 2,
    /// Close the connection without answering, without forwarding (the request never reached
    /// the store, so a retry is always safe).
    Drop = 3,
    /// Forward it, then pass back only the first half of the answer and close (the store did
    /// the request; the client cannot know).
    Cut = 4,
}

impl Fault {
    fn from_u8(v: u8) -> Fault {
        match v {
            1 => Fault::SlowDown,
            2 => Fault::TooMany,
            3 => Fault::Drop,
            4 => Fault::Cut,
            _ => Fault::Pass,
        }
    }
}

/// One request the proxy saw: its method, its path (no query) and what was done with it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The `Range` header, if any (ranged reads of packs).
    pub range: Option<String>,
    pub fault: Fault,
}

#[derive(Default)]
struct State {
    /// Applied to every request while not `Pass`.
    always: AtomicU8,
    /// Applied to the next `next_left` requests (after `always`).
    next: AtomicU8,
    next_left: AtomicU64,
    /// Applied to every `every_n`th request seen (0: never).
    every: AtomicU8,
    every_n: AtomicU64,
    /// Added before each request is handled, whatever is done with it.
    delay_ms: AtomicU64,
    /// Applied to the next requests of a method whose target (path and query) contains a
    /// string (checked first).
    targeted: Mutex<Option<Target>>,
    /// Once a request of this method whose path contains this string has been passed, every
    /// later request gets the fault (as [`FaultHandle::set`]); cleared when it fires.
    trigger: Mutex<Option<(String, String, Fault)>>,
    fired: std::sync::atomic::AtomicBool,
    seen: AtomicU64,
    forwarded: AtomicU64,
    log: Mutex<Vec<Seen>>,
}

struct Target {
    method: String,
    contains: String,
    fault: Fault,
    left: u64,
}

impl State {
    fn choose(&self, n: u64, method: &str, target: &str) -> Fault {
        if let Some(t) = self.targeted.lock().unwrap().as_mut() {
            if t.left > 0 && t.method == method && target.contains(&t.contains) {
                t.left -= 1;
                return t.fault;
            }
        }
        let always = Fault::from_u8(self.always.load(SeqCst));
        if always != Fault::Pass {
            return always;
        }
        if self
            .next_left
            .fetch_update(SeqCst, SeqCst, |k| k.checked_sub(1))
            .is_ok()
        {
            return Fault::from_u8(self.next.load(SeqCst));
        }
        let every = self.every_n.load(SeqCst);
        if every > 0 && n.is_multiple_of(every) {
            return Fault::from_u8(self.every.load(SeqCst));
        }
        Fault::Pass
    }
}

/// A running proxy; stops accepting when dropped. Its controls are on [`FaultHandle`] (it
/// derefs to one), which can be cloned into a task that switches faults while a test runs.
pub struct FaultProxy {
    addr: SocketAddr,
    handle: FaultHandle,
    accept: tokio::task::JoinHandle<()>,
}

/// The switches and counters of a [`FaultProxy`].
#[derive(Clone)]
pub struct FaultHandle {
    state: Arc<State>,
}

impl std::ops::Deref for FaultProxy {
    type Target = FaultHandle;
    fn deref(&self) -> &FaultHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FaultProxy {
    /// A proxy in front of `upstream`, passing everything through until told otherwise. Must be
    /// called inside a multi-threaded tokio runtime (its tasks run there).
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    // A client that goes away mid-request is no failure of the proxy.
                    let _ = serve(conn, upstream, st).await;
                });
            }
        });
        FaultProxy {
            addr,
            handle: FaultHandle { state },
            accept,
        }
    }

    /// The endpoint to give the S3 client (`AWS_ENDPOINT_URL`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A handle on the switches and counters, to move into a task.
    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }
}

impl FaultHandle {
    /// Applies `fault` to every request from now on (`Fault::Pass` ends it).
    pub fn set(&self, fault: Fault) {
        self.state.always.store(fault as u8, SeqCst);
    }

    /// Applies `fault` to the next `k` requests, then passes again.
    pub fn fail_next(&self, k: u64, fault: Fault) {
        self.state.next.store(fault as u8, SeqCst);
        self.state.next_left.store(k, SeqCst);
    }

    /// Applies `fault` to the next `k` requests with `method` whose target (path and query)
    /// contains `contains` (before any other rule), then passes them again.
    pub fn fail_next_matching(&self, k: u64, method: &str, contains: &str, fault: Fault) {
        *self.state.targeted.lock().unwrap() = Some(Target {
            method: method.to_string(),
            contains: contains.to_string(),
            fault,
            left: k,
        });
    }

    /// Applies `fault` to every request after the first one with `method` whose path contains
    /// `contains` (which itself passes): a fault that starts at a chosen point of a commit, with
    /// no race against it.
    pub fn set_after(&self, method: &str, contains: &str, fault: Fault) {
        self.state.fired.store(false, SeqCst);
        *self.state.trigger.lock().unwrap() =
            Some((method.to_string(), contains.to_string(), fault));
    }

    /// Whether the fault armed by [`FaultHandle::set_after`] has started.
    pub fn fired(&self) -> bool {
        self.state.fired.load(SeqCst)
    }

    /// Applies `fault` to every `n`th request seen (0: none).
    pub fn every(&self, n: u64, fault: Fault) {
        self.state.every.store(fault as u8, SeqCst);
        self.state.every_n.store(n, SeqCst);
    }

    /// Adds `delay` before each request is handled.
    pub fn delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, SeqCst);
    }

    /// Requests seen (read whole), faulted or not.
    pub fn seen(&self) -> u64 {
        self.state.seen.load(SeqCst)
    }

    /// Requests forwarded to the store and answered by it.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(SeqCst)
    }

    /// Every request seen so far, in order.
    pub fn log(&self) -> Vec<Seen> {
        self.state.log.lock().unwrap().clone()
    }

    /// Forgets the counts and the log (the faults stay as set).
    pub fn reset_counts(&self) {
        self.state.seen.store(0, SeqCst);
        self.state.forwarded.store(0, SeqCst);
        self.state.log.lock().unwrap().clear();
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, st: Arc<State>) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(head) = read_head(&mut client, &mut buf).await? else {
            return Ok(());
        };
        let framing = request_framing(&head)?;
        let body = read_body(&mut client, &mut buf, framing).await?;
        let (method, target) = request_line(&head);
        let path = target.split('?').next().unwrap_or("").to_string();
        let n = st.seen.fetch_add(1, SeqCst) + 1;
        let fault = st.choose(n, &method, &target);
        {
            let mut trigger = st.trigger.lock().unwrap();
            if let Some((m, contains, then)) = trigger.as_ref() {
                if fault == Fault::Pass && *m == method && path.contains(contains.as_str()) {
                    st.always.store(*then as u8, SeqCst);
                    st.fired.store(true, SeqCst);
                    *trigger = None;
                }
            }
        }
        st.log.lock().unwrap().push(Seen {
            method: method.clone(),
            path,
            range: header(&head, "range").map(str::to_string),
            fault,
        });
        let delay = st.delay_ms.load(SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        match fault {
            Fault::SlowDown => {
                let xml =
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                           <Message>Please reduce your request rate.</Message>\
                           <RequestId>faultproxy</RequestId></Error>";
                return refuse(&mut client, &method, "503 Slow Down", xml).await;
            }
            Fault::TooMany => {
                let xml =
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>TooManyRequests\
                           </Code><Message>Too many requests.</Message></Error>";
                return refuse(&mut client, &method, "429 Too Many Requests", xml).await;
            }
            Fault::Drop => return Ok(()),
            Fault::Pass | Fault::Cut => {}
        }
        let mut up = TcpStream::connect(upstream).await?;
        up.write_all(&head).await?;
        up.write_all(&body).await?;
        let mut ubuf = Vec::new();
        let answer = read_head(&mut up, &mut ubuf)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed early"))?;
        let rframing = response_framing(&answer, &method)?;
        let rbody = read_body(&mut up, &mut ubuf, rframing).await?;
        st.forwarded.fetch_add(1, SeqCst);
        if fault == Fault::Cut {
            let whole = [answer, rbody].concat();
            client.write_all(&whole[..whole.len() / 2]).await?;
            return Ok(());
        }
        client.write_all(&answer).await?;
        client.write_all(&rbody).await?;
        if rframing == Framing::UntilClose {
            return Ok(());
        }
    }
}

/// Answers a request with `status` and, except for HEAD, `body`, then closes the connection.
async fn refuse(client: &mut TcpStream, method: &str, status: &str, body: &str) -> io::Result<()> {
    let body = if method == "HEAD" { "" } else { body };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(answer.as_bytes()).await?;
    client.shutdown().await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// Reads more bytes into `buf`; an error at end of stream.
async fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 64 * 1024];
    let n = conn.read(&mut chunk).await?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The next message head (through its blank line), taken off the front of `buf`; None when the
/// peer closed before sending any byte of one.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(buf.drain(..end + 4).collect()));
        }
        match fill(conn, buf).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && buf.is_empty() => {
                return Ok(None)
            }
            other => other?,
        }
    }
}

/// A message body framed as `framing`, exactly as it was on the wire (chunk sizes included),
/// taken off the front of `buf`.
async fn read_body(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    framing: Framing,
) -> io::Result<Vec<u8>> {
    match framing {
        Framing::Empty => Ok(Vec::new()),
        Framing::Length(n) => {
            while buf.len() < n {
                fill(conn, buf).await?;
            }
            Ok(buf.drain(..n).collect())
        }
        Framing::UntilClose => {
            loop {
                match fill(conn, buf).await {
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    other => other?,
                }
            }
            Ok(std::mem::take(buf))
        }
        Framing::Chunked => {
            let mut at = 0;
            loop {
                let line_end = loop {
                    if let Some(p) = buf[at..].windows(2).position(|w| w == b"\r\n") {
                        break at + p;
                    }
                    fill(conn, buf).await?;
                };
                let line = std::str::from_utf8(&buf[at..line_end]).map_err(|_| bad("chunk"))?;
                let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                    .map_err(|_| bad("chunk size"))?;
                at = line_end + 2;
                if size == 0 {
                    // Trailers, then the blank line that ends the body.
                    loop {
                        let end = loop {
                            if let Some(p) = buf[at..].windows(2).position(|w| w == b"\r\n") {
                                break at + p;
                            }
                            fill(conn, buf).await?;
                        };
                        let blank = end == at;
                        at = end + 2;
                        if blank {
                            return Ok(buf.drain(..at).collect());
                        }
                    }
                }
                while buf.len() < at + size + 2 {
                    fill(conn, buf).await?;
                }
                at += size + 2;
            }
        }
    }
}

/// The value of header `name` in a message head.
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head)
        .ok()?
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn is_chunked(head: &[u8]) -> bool {
    header(head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(head: &[u8]) -> io::Result<Option<usize>> {
    header(head, "content-length")
        .map(|v| v.parse().map_err(|_| bad("content-length")))
        .transpose()
}

fn request_framing(head: &[u8]) -> io::Result<Framing> {
    if is_chunked(head) {
        return Ok(Framing::Chunked);
    }
    Ok(match content_length(head)? {
        Some(n) => Framing::Length(n),
        None => Framing::Empty,
    })
}

fn response_framing(head: &[u8], method: &str) -> io::Result<Framing> {
    let status: u16 = std::str::from_utf8(head)
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    if method == "HEAD" || status / 100 == 1 || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if is_chunked(head) {
        return Ok(Framing::Chunked);
    }
    Ok(match content_length(head)? {
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// The method and the target (path and query) of a request head.
fn request_line(head: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(head);
    let mut parts = text.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    (method, target)
}
